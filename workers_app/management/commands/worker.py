"""One worker node: the node agent plus a Celery consumer of this worker's own queue, in one process."""

from __future__ import annotations

import json
import logging

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from aimind.celery import app as celery_app
from workers_app.agent import NodeAgent
from workers_app.cluster import cluster_token
from workers_app.inventory import detect_ip


class Command(BaseCommand):
    help = "Join the cluster at AIMIND_SERVER_URL as worker AIMIND_WORKER_NAME and run backends."

    def add_arguments(self, parser):
        parser.add_argument("--labels", default="{}", help='labels as JSON, e.g. \'{"zone": "a"}\'')
        parser.add_argument("--concurrency", type=int, default=4)

    def handle(self, *args, labels: str, concurrency: int, **options):
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        if not settings.SERVER_URL:
            raise CommandError("AIMIND_SERVER_URL is not set (the control plane's base URL)")
        if not settings.REDIS_URL:
            raise CommandError("REDIS_URL is not set (the cluster's Redis, shared with the control plane)")
        try:
            parsed_labels = json.loads(labels)
        except ValueError as exc:
            raise CommandError(f"--labels is not JSON: {exc}") from None
        name = settings.WORKER_NAME
        agent = NodeAgent(name=name, server_url=settings.SERVER_URL, token=cluster_token(),
                          ip=settings.WORKER_IP or detect_ip(settings.SERVER_URL), data_dir=settings.DATA_DIR,
                          labels=parsed_labels)
        agent.start()
        try:
            celery_app.worker_main([
                "worker", "-Q", f"worker.{name}", "-P", "threads", "-c", str(concurrency), "-n", f"{name}@%h",
                "--without-gossip", "--without-mingle", "-l", "INFO",
            ])
        finally:
            agent.shutdown()
