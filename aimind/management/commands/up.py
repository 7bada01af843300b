"""Everything on one machine: Redis, web, scheduler, beat, and this machine as a worker."""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
from urllib.parse import urlsplit

from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError

from aimind.supervisor import (
    Child,
    Supervisor,
    console,
    control_plane_children,
    free_loopback_port,
    log_handler,
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
        settings.DATA_DIR.mkdir(parents=True, exist_ok=True)
        console_level = self.configure_logging()
        call_command("migrate", interactive=False, verbosity=0)
        call_command("bootstrap_admin", verbosity=0)
        cluster_token()
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "AIMIND_DATA_DIR": str(settings.DATA_DIR)}
        supervisor = Supervisor(env, settings.DATA_DIR, console_level)
        supervisor.install_signal_handlers()
        try:
            self.start_children(supervisor, env)
            self.summary()
            threading.Thread(target=self.watch_workers, args=(supervisor.stopping,), daemon=True,
                             name="workers-joined").start()
            supervisor.run_until_stopped()
        finally:
            supervisor.stop_all()
            self.stdout.write("aiMindServe stopped.")

    @staticmethod
    def configure_logging() -> int:
        """This process logs to <data dir>/logs/up.log; the console gets AIMIND_LOG_LEVEL (warnings and errors by
        default) from it and from every child."""
        level = logging.getLevelName(settings.LOG_LEVEL)
        root = logging.getLogger()
        root.setLevel(logging.INFO if level > logging.INFO else level)
        for handler in list(root.handlers):
            root.removeHandler(handler)
        to_console = logging.StreamHandler()
        to_console.setLevel(level)
        to_file = log_handler(settings.DATA_DIR / "logs" / "up.log")
        for handler in (to_console, to_file):
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            root.addHandler(handler)
        return level

    def summary(self) -> None:
        console(self.summary_text())

    @staticmethod
    def summary_text() -> str:
        """What a person needs after start-up: where it answers, how to sign in, how workers join, where the logs
        are."""
        data = settings.DATA_DIR
        password = data / "initial_admin_password"
        if password.exists():  # bootstrap_admin wrote it: the admin was made without AIMIND_BOOTSTRAP_PASSWORD
            sign_in = f"user admin, first password in {password}"
        elif os.environ.get("AIMIND_BOOTSTRAP_PASSWORD", "").strip():
            sign_in = "user admin (AIMIND_BOOTSTRAP_PASSWORD)"
        else:
            sign_in = "user admin"
        lines = [f"aiMindServe is running at http://{settings.HOST}:{settings.PORT}/",
                 f"  pages /, admin /admin/, API /api/v1/ (docs /api/docs/), OpenAI /v1/ — sign in as {sign_in}",
                 f"  workers join with AIMIND_SERVER_URL and the token in {data / 'token'}",
                 f"  logs: {data / 'logs'}/ (the console shows {settings.LOG_LEVEL.lower()} and above: "
                 f"AIMIND_LOG_LEVEL=INFO for more). Ctrl-C stops it."]
        return "\n".join(lines)

    @staticmethod
    def watch_workers(stopping: threading.Event) -> None:
        """Say when a worker joins (with what it has) and when one stops answering."""
        from django.db import close_old_connections

        from workers_app.choices import WorkerState
        from workers_app.models import Worker

        told: dict[str, str] = {}
        while not stopping.wait(1.0):
            try:
                for worker in Worker.objects.only("name", "state", "state_message", "status"):
                    if told.get(worker.name) == worker.state:
                        continue
                    told[worker.name] = worker.state
                    if worker.state == WorkerState.READY:
                        status = worker.status or {}
                        gpus = status.get("gpus") or []
                        ram = (status.get("memory") or {}).get("total") or 0
                        console(f"worker {worker.name} joined: {(status.get('cpu') or {}).get('total', '?')} cores, "
                                f"{ram / 1024**3:.1f} GiB RAM, " + (f"{len(gpus)} GPU(s): " + ", ".join(
                                    sorted({str(g.get('name')) for g in gpus})) if gpus else "no GPU"))
                    else:
                        console(f"worker {worker.name} is {worker.state}: {worker.state_message}")
            except Exception as exc:  # the database restarting: say nothing, look again
                logger.info("could not look at the workers: %s", exc)
            finally:
                close_old_connections()

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
