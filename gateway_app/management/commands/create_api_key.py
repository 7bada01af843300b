from datetime import timedelta

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from gateway_app.models import ApiKey


class Command(BaseCommand):
    help = "Create an admin API key; the key is printed once, alone on the last line."

    def add_arguments(self, parser):
        parser.add_argument("name", help="what the key is for, e.g. 'ci' or 'open-webui'")
        parser.add_argument("--user", default=None, help="owner (default: the first superuser)")
        parser.add_argument("--scope", choices=["admin", "inference"], default="admin",
                            help="admin: the management API and the gateway; inference: the /v1 gateway only")
        parser.add_argument("--expires-in-days", type=float, default=None, help="the key stops working after this")

    def handle(self, *args, name: str, user: str | None, scope: str, expires_in_days: float | None, **options):
        User = get_user_model()
        owner = (User.objects.filter(username=user) if user
                 else User.objects.filter(is_superuser=True, is_active=True).order_by("id")).first()
        if owner is None:
            raise CommandError("no such user" if user else "no admin user yet: run `manage.py bootstrap_admin`")
        expires = timezone.now() + timedelta(days=expires_in_days) if expires_in_days else None
        key, raw = ApiKey.issue(owner, name, scope, expires)
        self.stdout.write(f"{scope} API key {name!r} for {owner.username}"
                          + (f", expires {expires:%Y-%m-%d %H:%M} UTC" if expires else "")
                          + " (store it now; only its hash is kept):")
        self.stdout.write(raw)
