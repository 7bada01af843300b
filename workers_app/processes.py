"""Backend processes on this worker: start in their own process group, record, find again, end."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

logger = logging.getLogger(__name__)


@dataclass
class BackendProcess:
    instance_id: int
    popen: subprocess.Popen | None
    pid: int
    port: int
    host: str
    log_path: Path
    started_at: float
    health_failures: int = 0
    healthy_once: bool = False
    adopted: bool = False  # started by a previous run of this worker's agent: not our child
    attempt: int = 0  # which start of the instance this is (its log is kept under this number; 0: not counted)

    def poll(self) -> int | None:
        if self.popen is not None:
            return self.popen.poll()
        return None if psutil.pid_exists(self.pid) else -1


def pidfile_dir(data_dir: Path) -> Path:
    path = data_dir / "run" / "instances"
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_pidfile(data_dir: Path, proc: BackendProcess, worker_name: str, key: str = "", **extra) -> None:
    """Record a process this agent started, so that a restarted agent can find it again. `key` names the record
    (default: the instance id; an RPC part has its own)."""
    create_time = psutil.Process(proc.pid).create_time()
    record = {"instance_id": proc.instance_id, "pid": proc.pid, "create_time": create_time,
              "port": proc.port, "worker": worker_name, "key": key or str(proc.instance_id), **extra}
    target = pidfile_dir(data_dir) / f"{key or proc.instance_id}.json"
    tmp = target.with_suffix(".tmp")
    tmp.write_text(json.dumps(record))
    tmp.replace(target)


def remove_pidfile(data_dir: Path, key: int | str) -> None:
    (pidfile_dir(data_dir) / f"{key}.json").unlink(missing_ok=True)


def recorded_processes(data_dir: Path) -> list[dict]:
    records = []
    for path in sorted(pidfile_dir(data_dir).glob("*.json")):
        try:
            records.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            path.unlink(missing_ok=True)
    return records


def is_same_process(record: dict) -> bool:
    """The pid is alive and is the process we started (not a recycled pid)."""
    try:
        return abs(psutil.Process(record["pid"]).create_time() - record["create_time"]) < 0.01
    except (psutil.Error, KeyError):
        return False


def clean_environment(env: dict[str, str]) -> dict[str, str]:
    """The backend's environment: the few variables of the worker's own it needs (PATH, HOME, locale, CUDA and
    proxy settings …), then `env`. The worker's secrets (Redis, database, token) never reach it."""
    from workers_app.backends.base import INHERITED_ENV

    return {**{k: v for k, v in os.environ.items() if INHERITED_ENV.match(k)}, **env}


def start(cmd: list[str], *, env: dict[str, str], log_path: Path, secrets: tuple[str, ...] = ()) -> subprocess.Popen:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    shown = " ".join(cmd)
    for secret in secrets:  # the command line is logged; a key on it is not
        shown = shown.replace(secret, "***")
    with open(log_path, "ab") as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} starting: {shown}\n".encode())
        log.flush()
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=clean_environment(env), start_new_session=True)


def terminate_group(pid: int, popen: subprocess.Popen | None = None, grace: float = 5.0) -> None:
    """SIGTERM the backend's own process group, then SIGKILL it if still there after `grace` seconds."""
    _signal_group(pid, signal.SIGTERM)
    if not _wait_gone(pid, popen, grace):
        _signal_group(pid, signal.SIGKILL)
        _wait_gone(pid, popen, 2.0)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass
    except PermissionError:
        logger.warning("not allowed to signal process group %s", pgid)


def _wait_gone(pgid: int, popen: subprocess.Popen | None, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if popen is not None:
            popen.poll()  # reap our child so it does not linger as a zombie
        if not group_alive(pgid):
            return True
        time.sleep(0.05)
    return False


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie leader whose parent has not reaped it yet is gone for our purposes
        return psutil.Process(pgid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True  # the leader is gone but other members remain


def free_port(host: str, lo: int, hi: int, taken: set[int]) -> int:
    for port in range(lo, hi + 1):
        if port in taken:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host if host != "0.0.0.0" else "", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port between {lo} and {hi}")


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with code {returncode}"


def tail_lines(path: Path, n: int = 50, max_bytes: int = 64 * 1024, current_run_only: bool = True) -> list[str]:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read()
    except OSError:
        return []
    lines = data.decode("utf-8", "replace").splitlines()
    # Only this run's lines: the launcher writes a marker line before each start.
    for i in range(len(lines) - 1, -1, -1) if current_run_only else ():
        if lines[i].startswith("=== ") and " starting: " in lines[i]:
            lines = lines[i + 1:]
            break
    return lines[-n:]
