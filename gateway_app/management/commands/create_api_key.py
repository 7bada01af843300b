from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from gateway_app.models import ApiKey


class Command(BaseCommand):
    help = "Create an admin API key; the key is printed once, alone on the last line."

    def add_arguments(self, parser):
        parser.add_argument("name", help="what the key is for, e.g. 'ci' or 'open-webui'")
        parser.add_argument("--user", default=None, help="owner (default: the first superuser)")

    def handle(self, *args, name: str, user: str | None, **options):
        User = get_user_model()
        owner = (User.objects.filter(username=user) if user
                 else User.objects.filter(is_superuser=True, is_active=True).order_by("id")).first()
        if owner is None:
            raise CommandError("no such user" if user else "no admin user yet: run `manage.py bootstrap_admin`")
        key, raw = ApiKey.issue(owner, name)
        self.stdout.write(f"API key {name!r} for {owner.username} (store it now; only its hash is kept):")
        self.stdout.write(raw)
