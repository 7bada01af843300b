"""Everything on one machine: Redis, web, scheduler, beat, and this machine as a worker."""

from __future__ import annotations

import logging
import os
import secrets
import socket
from urllib.parse import urlsplit

from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError

from aimind.supervisor import (
    Child,
    Supervisor,
    control_plane_children,
    free_loopback_port,
    manage_cmd,
    redis_child,
    wait_for_port,
)
from workers_app.cluster import cluster_token

logger = logging.getLogger("aimind.up")


class Command(BaseCommand):
    help = "Run the whole product on this machine in the foreground; Ctrl-C stops all of it."
    with_worker = True

    def handle(self, *args, **options):
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        settings.DATA_DIR.mkdir(parents=True, exist_ok=True)
        call_command("migrate", interactive=False, verbosity=0)
        call_command("bootstrap_admin")
        cluster_token()
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "AIMIND_DATA_DIR": str(settings.DATA_DIR)}
        supervisor = Supervisor(env, settings.DATA_DIR)
        supervisor.install_signal_handlers()
        code = 1
        try:
            self.start_children(supervisor, env)
            self.stdout.write(f"aiMindServe is running at http://{settings.HOST}:{settings.PORT}/ "
                              f"(admin: /admin/, API: /api/v1/, OpenAI: /v1/). Ctrl-C stops it.")
            code = supervisor.run_until_stopped()
        finally:
            supervisor.stop_all()
            self.stdout.write("aiMindServe stopped.")
        if code:
            raise CommandError("a component kept failing; see the log above")

    def start_children(self, supervisor: Supervisor, env: dict[str, str]) -> None:
        if settings.REDIS_URL and settings.HOST not in ("127.0.0.1", "localhost", "::1") \
                and not urlsplit(settings.REDIS_URL).password:
            raise CommandError(f"REDIS_URL has no password, and AIMIND_HOST={settings.HOST} serves workers on other "
                               f"hosts, which would use that Redis as their broker: give it a password "
                               f"(redis://:PASSWORD@host:port/0)")
        if not settings.REDIS_URL:
            port = free_loopback_port()
            password = secrets.token_urlsafe(24)
            redis = supervisor.spawn(redis_child(settings.DATA_DIR, port, password, settings.HOST))
            if not wait_for_port("127.0.0.1", port, 10, alive=lambda: redis.popen.poll() is None):
                raise CommandError("the embedded Redis did not start")
            env["REDIS_URL"] = f"redis://:{password}@127.0.0.1:{port}/0"
            run_dir = settings.DATA_DIR / "run"
            run_dir.mkdir(parents=True, exist_ok=True)
            url_file = run_dir / "redis.url"  # for workers added on this machine; it holds the password: ours only
            url_file.touch(mode=0o600)
            url_file.chmod(0o600)
            url_file.write_text(env["REDIS_URL"] + "\n")
        connect_host = "127.0.0.1" if settings.HOST in ("0.0.0.0", "::", "") else settings.HOST
        env.setdefault("AIMIND_SERVER_URL", f"http://{connect_host}:{settings.PORT}")
        if self.with_worker:
            env.setdefault("AIMIND_WORKER_IP", "127.0.0.1")  # one machine: backends stay on loopback
        hostname = socket.gethostname()
        web, *rest = control_plane_children(settings.HOST, settings.PORT, hostname)
        supervisor.spawn(web)
        if not wait_for_port(connect_host, settings.PORT, 60, alive=lambda: web.popen.poll() is None):
            raise CommandError(f"the web server did not start on {settings.HOST}:{settings.PORT}")
        for child in rest:
            supervisor.spawn(child)
        if self.with_worker:
            supervisor.spawn(Child("worker", manage_cmd("worker"), stop_timeout=30))
