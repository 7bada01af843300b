from django.apps import AppConfig
from django.utils.translation import gettext_lazy as _


class GatewayConfig(AppConfig):
    name = "gateway_app"
    verbose_name = _("API keys")

    def ready(self) -> None:
        from gateway_app import changes

        changes.connect()
