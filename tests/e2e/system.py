"""A real aiMindServe (`manage.py up`) started as a subprocess, and helpers to drive it over HTTP."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import httpx
import psutil

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def create_e2e_database(server_url: str) -> tuple[str, str]:
    """A fresh, uniquely named database on the PostgreSQL server of `server_url`: (its name, its URL)."""
    import psycopg
    from psycopg import sql

    name = f"aimind_e2e_{os.getpid()}_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return name, urlunsplit(urlsplit(server_url)._replace(path=f"/{name}"))


def drop_e2e_database(server_url: str, name: str) -> None:
    """Drop a database made by `create_e2e_database`, ending any connection still open to it."""
    import psycopg
    from psycopg import sql

    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def fresh_cache(tmp: Path) -> Path:
    """A model cache of its own (downloads start from nothing) that still finds the llama.cpp build made at set-up."""
    real = Path(os.environ.get("AIMIND_CACHE_DIR") or Path.home() / ".cache" / "aimind").expanduser()
    cache = tmp / "cache"
    cache.mkdir()
    (cache / "backends").symlink_to(real / "backends", target_is_directory=True)
    return cache


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
    # PostgreSQL runs only (AIMIND_TEST_DATABASE_URL): the server, and the database made for this system.
    pg_server_url: str = ""
    pg_database: str = ""
    host: str = "127.0.0.1"  # where its web server listens (a cluster's server: its bridge address)

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def client(self, key: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key or self.api_key}"}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=30)

    def manage(self, *args: str, timeout: float = 120) -> str:
        done = subprocess.run([sys.executable, str(REPO / "manage.py"), *args], env=self.env, cwd=REPO,
                              capture_output=True, text=True, timeout=timeout)
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

    def wait_for_instances(self, model_id: int, state: str, count: int = 1, timeout: float = 90,
                           tolerate_errors: bool = False, message: str = "") -> list[dict]:
        """Wait for `count` instances in `state` (whose state_message holds `message`, when given: a new
        instance is pending before the scheduler has said why it waits)."""
        with self.client() as c:
            def ready():
                instances = c.get(f"/api/v1/models/{model_id}/instances").json()
                self.descendants()
                matching = [i for i in instances if i["state"] == state and message in i["state_message"]]
                failed = [i for i in instances if i["state"] == "error" and state != "error" and not tolerate_errors]
                if failed:
                    raise AssertionError(f"instance {failed[0]['name']} failed: {failed[0]['state_message']}")
                return matching if len(matching) >= count else None

            try:
                return wait_until(ready, timeout, f"{count} instance(s) of model {model_id} {state}")
            except AssertionError as exc:
                raise AssertionError(f"{exc}\n{c.get(f'/api/v1/models/{model_id}/instances').text}\n"
                                     f"{self.log_tail()}") from None

    def deploy_and_watch(self, body: dict, timeout: float) -> dict:
        """POST a one-replica model, then wait for its instance to run, noting each state (and the start of its
        message) it passed through: `{"model", "instance", "seen", "posted_at"}`."""
        posted_at = time.time()
        seen: set[str] = set()
        with self.client() as c:
            created = c.post("/api/v1/models", json=body)
            assert created.status_code == 201, created.text
            model = created.json()

            def running():
                [instance] = c.get(f"/api/v1/models/{model['id']}/instances").json()
                seen.add(f"{instance['state']}: {instance['state_message'][:80]}")
                if instance["state"] == "error":
                    raise AssertionError(f"{body['name']} failed: {instance['state_message']}\n{self.log_tail()}")
                return instance if instance["state"] == "running" else None

            instance = wait_until(running, timeout, f"{body['name']} to run", interval=0.5)
            model = c.get(f"/api/v1/models/{model['id']}").json()
        return {"model": model, "instance": instance, "seen": seen, "posted_at": posted_at}

    def stop(self, timeout: float = 60, keep_database: bool = False) -> int:
        """SIGTERM to `up`; its exit code. `keep_database`: to start it again on the same data (PostgreSQL)."""
        self.descendants()
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.popen.pid, signal.SIGKILL)
            raise
        finally:
            if not keep_database:
                self.drop_database()

    def drop_database(self) -> None:
        """Drop this system's PostgreSQL database (once its processes are gone); nothing to do on SQLite."""
        if not self.pg_database:
            return
        procs = []
        for pid in self.known_pids | {self.popen.pid}:
            try:
                procs.append(psutil.Process(pid))
            except psutil.NoSuchProcess:
                continue
        psutil.wait_procs(procs, timeout=15)  # what is still alive after this loses its connection (FORCE)
        drop_e2e_database(self.pg_server_url, self.pg_database)
        self.pg_database = ""

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


def start_system(tmp: Path, worker_name: str = "e2e-worker", extra_env: dict[str, str] | None = None,
                 again: RunningSystem | None = None, command: str = "up", host: str = "127.0.0.1",
                 database_url: str = "") -> RunningSystem:
    """`up` in `tmp`. `again`: a stopped system (stopped with keep_database) to start once more on its data.
    `command="server"`: the control plane alone, listening on `host` (no worker: `worker_name` is ignored).
    `database_url`: a database the test owns (left alone on stop), instead of SQLite or a fresh PostgreSQL one."""
    data_dir = tmp / "data"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIMIND_", "DATABASE_URL", "REDIS_URL"))}
    # SQLite in the data dir by default; with AIMIND_TEST_DATABASE_URL, a fresh database on that server.
    pg_server_url = os.environ.get("AIMIND_TEST_DATABASE_URL", "")
    pg_database = ""
    if database_url:
        pg_server_url, env["DATABASE_URL"] = "", database_url
    elif again is not None and again.pg_database:
        pg_database, env["DATABASE_URL"] = again.pg_database, again.env["DATABASE_URL"]
    elif pg_server_url:
        pg_database, env["DATABASE_URL"] = create_e2e_database(pg_server_url)
    if os.environ.get("AIMIND_CACHE_DIR"):
        env["AIMIND_CACHE_DIR"] = os.environ["AIMIND_CACHE_DIR"]
    env.update({
        "AIMIND_DATA_DIR": str(data_dir), "AIMIND_HOST": host, "AIMIND_PORT": str(port),
        "AIMIND_BOOTSTRAP_PASSWORD": "e2e-password",
        "AIMIND_WORKER_NAME": worker_name, "AIMIND_HEARTBEAT_INTERVAL": "1", "AIMIND_HEALTH_CHECK_INTERVAL": "0.2",
        # Time-dependent behaviour, shortened: restarts back off 2 s, 4 s, 8 s; silent workers are lost after 6 s.
        "AIMIND_RESTART_BACKOFF_BASE": "2", "AIMIND_RESTART_BACKOFF_MAX": "8", "AIMIND_WORKER_STALE_AFTER": "6",
        "AIMIND_BACKEND_PORT_MIN": str(20000 + port % 20000), "AIMIND_BACKEND_PORT_MAX": str(20200 + port % 20000),
        "AIMIND_LOG_LEVEL": "INFO",  # everything in up.log too, for a failing test's log_tail
        **(extra_env or {}),
    })
    log_path = tmp / "up.log"
    try:
        with open(log_path, "wb") as log:
            popen = subprocess.Popen([sys.executable, str(REPO / "manage.py"), command], env=env, cwd=REPO,
                                     stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
    except BaseException:
        if pg_database:
            drop_e2e_database(pg_server_url, pg_database)
        raise
    system = RunningSystem(data_dir, port, env, popen, log_path, pg_server_url=pg_server_url,
                           pg_database=pg_database, host=host)
    try:
        _wait_until_up(system, worker_name if command == "up" else "")
    except BaseException:
        # Nobody else will stop a system that never came up: end its processes and drop its database.
        try:
            system.stop(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        raise
    return system


def _wait_until_up(system: RunningSystem, worker_name: str) -> None:
    popen = system.popen

    def web_up():
        if popen.poll() is not None:
            raise AssertionError(f"`up` exited with {popen.returncode}:\n{system.log_tail()}")
        try:
            return httpx.get(f"{system.base_url}/api/v1/models", timeout=1).status_code == 401
        except httpx.HTTPError:
            return False

    wait_until(web_up, 90, "the web server")
    system.api_key = system.manage("create_api_key", "e2e").strip().splitlines()[-1]
    if not worker_name:
        return
    with system.client() as c:
        wait_until(lambda: any(w["name"] == worker_name and w["state"] == "ready"
                               for w in c.get("/api/v1/workers").json()), 60, f"worker {worker_name} to join")
    system.descendants()


def start_extra_worker(system: RunningSystem, name: str, tmp: Path, server_url: str = "") -> subprocess.Popen:
    """A second `manage.py worker` on this machine, joining `system` with its URL (or `server_url`) and token (its
    own data dir)."""
    data_dir = tmp / f"worker-{name}"
    data_dir.mkdir(parents=True, exist_ok=True)
    # Only the server's URL and the cluster token: the broker comes from the registration answer, and a
    # worker node never opens the database.
    env = {k: v for k, v in system.env.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    env.update({
        "AIMIND_DATA_DIR": str(data_dir), "AIMIND_WORKER_NAME": name, "AIMIND_WORKER_IP": "127.0.0.1",
        "AIMIND_SERVER_URL": server_url or system.base_url,
        "AIMIND_TOKEN": system.env.get("AIMIND_TOKEN") or (system.data_dir / "token").read_text().strip(),
        "AIMIND_BACKEND_PORT_MIN": str(int(env["AIMIND_BACKEND_PORT_MIN"]) + 500),
        "AIMIND_BACKEND_PORT_MAX": str(int(env["AIMIND_BACKEND_PORT_MAX"]) + 500),
    })
    log = open(tmp / f"worker-{name}.log", "ab")
    return subprocess.Popen([sys.executable, str(REPO / "manage.py"), "worker"], env=env, cwd=REPO, stdout=log,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
