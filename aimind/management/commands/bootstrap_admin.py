import os
import secrets

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = "Create the first admin user `admin` if there is none (idempotent)."

    def handle(self, *args, **options):
        User = get_user_model()
        if User.objects.filter(username="admin").exists():
            return
        password = os.environ.get("AIMIND_BOOTSTRAP_PASSWORD", "").strip()
        if password:
            User.objects.create_superuser("admin", password=password)
            self.stdout.write("Created admin user `admin` with the password from AIMIND_BOOTSTRAP_PASSWORD.")
            return
        password = secrets.token_urlsafe(12)
        User.objects.create_superuser("admin", password=password)
        settings.DATA_DIR.mkdir(parents=True, exist_ok=True)
        path = settings.DATA_DIR / "initial_admin_password"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(password + "\n")
        self.stdout.write(f"Created admin user `admin` with password: {password}  (also saved in {path})")
