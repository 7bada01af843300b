"""One worker node: the node agent plus a Celery consumer of this worker's own queue, in one process.

It needs the server's URL and the cluster token, nothing else: the broker address comes with its registration, and
it never opens the database (settings give this command none; it reads and reports through the server's API).
"""

from __future__ import annotations

import faulthandler
import json
import logging
import os
import signal

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from aimind.celery import app as celery_app
from workers_app.agent import NodeAgent
from workers_app.inventory import detect_ip
from workers_app.server_link import NameTaken, ServerUnreachable
from workers_app.sizes import parse_size


def cluster_token_for_worker() -> str:
    """A worker presents the token the server gave out: AIMIND_TOKEN, or the server's token file when it shares the
    server's data dir (`up`). It never makes one up."""
    explicit = os.environ.get("AIMIND_TOKEN", "").strip()
    if explicit:
        return explicit
    path = settings.DATA_DIR / "token"
    if path.is_file():
        return path.read_text().strip()
    raise CommandError("AIMIND_TOKEN is not set (the cluster token: `cat <server data dir>/token` on the server)")


class Command(BaseCommand):
    help = "Join the cluster at AIMIND_SERVER_URL (with AIMIND_TOKEN) as worker AIMIND_WORKER_NAME and run backends."
    requires_system_checks = []  # no database here, and nothing to check against one

    def add_arguments(self, parser):
        parser.add_argument("--labels", default="{}", help='labels as JSON, e.g. \'{"zone": "a"}\'')
        parser.add_argument("--reserved-ram", default=None,
                            help="RAM this worker keeps for itself, e.g. 4GiB (the scheduler never books it)")
        parser.add_argument("--reserved-vram", default=None, help="VRAM per GPU this worker keeps, e.g. 1GiB")
        parser.add_argument("--concurrency", type=int, default=4)

    def handle(self, *args, labels: str, reserved_ram: str | None, reserved_vram: str | None, concurrency: int,
               **options):
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        faulthandler.register(signal.SIGUSR1)  # `kill -USR1 <pid>`: every thread's stack, to its log
        if not settings.SERVER_URL:
            raise CommandError("AIMIND_SERVER_URL is not set (the control plane's base URL)")
        try:
            parsed_labels = json.loads(labels)
        except ValueError as exc:
            raise CommandError(f"--labels is not JSON: {exc}") from None
        reserved = {}
        try:
            if reserved_ram is not None:
                reserved["ram"] = parse_size(reserved_ram)
            if reserved_vram is not None:
                reserved["vram"] = parse_size(reserved_vram)
        except ValueError as exc:
            raise CommandError(f"--reserved-ram/--reserved-vram: {exc}") from None
        name = settings.WORKER_NAME
        agent = NodeAgent(name=name, server_url=settings.SERVER_URL, token=cluster_token_for_worker(),
                          ip=settings.WORKER_IP or detect_ip(settings.SERVER_URL.split(",")[0]),
                          data_dir=settings.DATA_DIR,
                          labels=parsed_labels, system_reserved=reserved)
        try:
            answer = agent.join()
        except NameTaken as exc:
            raise CommandError(f"cannot join as {name}: {exc}") from None
        except PermissionError as exc:
            raise CommandError(str(exc)) from None
        except ServerUnreachable as exc:
            raise CommandError(f"the server did not answer: {exc}") from None
        broker = settings.REDIS_URL or answer.get("broker_url") or ""
        if not broker:
            raise CommandError("the server gave no broker address and REDIS_URL is not set")
        settings.REDIS_URL = broker  # log shipping
        celery_app.conf.broker_url = broker
        agent.attach_log_shipper()
        agent.start()
        try:
            celery_app.worker_main([
                "worker", "-Q", f"worker.{name}", "-P", "threads", "-c", str(concurrency), "-n", f"{name}@%h",
                "--without-gossip", "--without-mingle", "-l", "INFO",
            ])
        finally:
            agent.shutdown()
