from django.db import models
from django.utils.translation import gettext_lazy as _


class WorkerState(models.TextChoices):
    READY = "ready", _("Ready")
    NOT_READY = "not_ready", _("Not ready")
    UNREACHABLE = "unreachable", _("Unreachable")

    @classmethod
    def colour(cls, state: str) -> str:
        return {cls.READY: "#198754", cls.NOT_READY: "#fd7e14", cls.UNREACHABLE: "#dc3545"}.get(state, "#6c757d")
