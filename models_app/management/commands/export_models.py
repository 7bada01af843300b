"""`manage.py export_models > models.yaml`: every model's settings as YAML (env values included: keep it private)."""

from django.core.management.base import BaseCommand

from models_app.portable import export_models


class Command(BaseCommand):
    help = "Print every model's settings as YAML, for import_models (env values included: keep the file private)."

    def handle(self, *args, **options):
        self.stdout.write(export_models(), ending="")
