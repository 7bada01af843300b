"""`manage.py import_models models.yaml` (or - for standard input): create or update the models by name."""

import sys
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from models_app.portable import ImportRefused, import_models


class Command(BaseCommand):
    help = ("Create or update models by name from a file export_models wrote (idempotent; all or nothing). "
            "Models not in the file are left alone.")

    def add_arguments(self, parser):
        parser.add_argument("path", help="the YAML file, or - for standard input")

    def handle(self, *args, path: str, **options):
        try:
            text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise CommandError(f"cannot read {path}: {exc.strerror}") from None
        try:
            done = import_models(text)
        except ImportRefused as exc:
            raise CommandError(f"{exc}; nothing was changed") from None
        for what, names in done.items():
            self.stdout.write(f"{what}: {len(names)}" + (f" ({', '.join(names)})" if names else ""))
