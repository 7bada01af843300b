"""A real aiMindServe (`manage.py up`) started as a subprocess, and helpers to drive it over HTTP."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")


@dataclass
class RunningSystem:
    data_dir: Path
    port: int
    env: dict[str, str]
    popen: subprocess.Popen
    log_path: Path
    api_key: str = ""
    known_pids: set[int] = field(default_factory=set)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, key: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key or self.api_key}"}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=30)

    def manage(self, *args: str) -> str:
        done = subprocess.run([sys.executable, str(REPO / "manage.py"), *args], env=self.env, cwd=REPO,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return done.stdout

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def descendants(self) -> set[int]:
        """Every process in the tree under `up`, including backends in their own sessions."""
        try:
            pids = {p.pid for p in psutil.Process(self.popen.pid).children(recursive=True)}
        except psutil.NoSuchProcess:
            pids = set()
        self.known_pids |= pids
        return pids

    def wait_for_instances(self, model_id: int, state: str, count: int = 1, timeout: float = 90) -> list[dict]:
        with self.client() as c:
            def ready():
                instances = c.get(f"/api/v1/models/{model_id}/instances").json()
                self.descendants()
                matching = [i for i in instances if i["state"] == state]
                failed = [i for i in instances if i["state"] == "error" and state != "error"]
                if failed:
                    raise AssertionError(f"instance {failed[0]['name']} failed: {failed[0]['state_message']}")
                return matching if len(matching) >= count else None

            try:
                return wait_until(ready, timeout, f"{count} instance(s) of model {model_id} {state}")
            except AssertionError as exc:
                raise AssertionError(f"{exc}\n{c.get(f'/api/v1/models/{model_id}/instances').text}\n"
                                     f"{self.log_tail()}") from None

    def stop(self, timeout: float = 60) -> int:
        self.descendants()
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.popen.pid, signal.SIGKILL)
            raise

    def leftovers(self) -> list[str]:
        alive = []
        for pid in self.known_pids:
            try:
                proc = psutil.Process(pid)
                if proc.status() != psutil.STATUS_ZOMBIE:
                    alive.append(f"{pid} {' '.join(proc.cmdline())}")
            except psutil.NoSuchProcess:
                continue
        return alive


def start_system(tmp: Path, worker_name: str = "e2e-worker", extra_env: dict[str, str] | None = None) -> RunningSystem:
    data_dir = tmp / "data"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIMIND_", "DATABASE_URL", "REDIS_URL"))}
    if os.environ.get("AIMIND_CACHE_DIR"):
        env["AIMIND_CACHE_DIR"] = os.environ["AIMIND_CACHE_DIR"]
    env.update({
        "AIMIND_DATA_DIR": str(data_dir), "AIMIND_PORT": str(port), "AIMIND_BOOTSTRAP_PASSWORD": "e2e-password",
        "AIMIND_WORKER_NAME": worker_name, "AIMIND_HEARTBEAT_INTERVAL": "1", "AIMIND_HEALTH_CHECK_INTERVAL": "0.2",
        "AIMIND_BACKEND_PORT_MIN": str(20000 + port % 20000), "AIMIND_BACKEND_PORT_MAX": str(20200 + port % 20000),
        **(extra_env or {}),
    })
    log_path = tmp / "up.log"
    log = open(log_path, "wb")
    popen = subprocess.Popen([sys.executable, str(REPO / "manage.py"), "up"], env=env, cwd=REPO, stdout=log,
                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    system = RunningSystem(data_dir, port, env, popen, log_path)

    def web_up():
        if popen.poll() is not None:
            raise AssertionError(f"`up` exited with {popen.returncode}:\n{system.log_tail()}")
        try:
            return httpx.get(f"{system.base_url}/api/v1/models", timeout=1).status_code == 401
        except httpx.HTTPError:
            return False

    wait_until(web_up, 90, "the web server")
    system.api_key = system.manage("create_api_key", "e2e").strip().splitlines()[-1]
    with system.client() as c:
        wait_until(lambda: any(w["name"] == worker_name and w["state"] == "ready"
                               for w in c.get("/api/v1/workers").json()), 60, f"worker {worker_name} to join")
    system.descendants()
    return system
