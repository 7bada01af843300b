"""Install a backend version on this node ahead of time (otherwise a worker installs it on first use)."""

from __future__ import annotations

import time

from django.core.management.base import BaseCommand, CommandError

from workers_app import backends, inventory
from workers_app.backends.base import BackendError


class Command(BaseCommand):
    help = ("Install backend NAME (llama-box, vllm, vox-box) into AIMIND_CACHE_DIR/backends/NAME/VERSION/, "
            "printing progress. Without --version, the product's default version.")

    def add_base_argument(self, parser, *args, **kwargs):
        if "--version" not in args:  # ours is the backend's version, not Django's
            super().add_base_argument(parser, *args, **kwargs)

    def add_arguments(self, parser):
        parser.add_argument("name", choices=backends.names())
        parser.add_argument("--version", default="", help="the backend version (default: the product's)")

    def handle(self, *args, name: str, version: str, **options):
        backend = backends.get_backend(name)
        version = version or backend.default_version
        node = inventory.node_info()
        variant = backend.variant(node)
        label = f"{name} {version}" + (f" ({variant})" if variant else "")
        found = backend.find(version, variant)
        if found is not None:
            self.stdout.write(f"{label} is already installed: {found.entry}")
            return
        ok, reason = backend.installable(node)
        if not ok:
            raise CommandError(f"{name} cannot be installed on this node: {reason}")
        started = time.monotonic()
        self.stdout.write(f"installing {label} …")
        try:
            installed = backend.install(version, variant, progress=lambda line: self.stdout.write(line, ending="\n"))
        except BackendError as exc:
            raise CommandError(str(exc)) from None
        self.stdout.write(f"installed {label} in {time.monotonic() - started:.0f} s: {installed.entry}")
