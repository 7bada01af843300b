"""Serving survives the control plane: two `manage.py server` processes side by side on one PostgreSQL and one
Redis (both of the test's own, so it may stop them), a worker that knows both, the tiny model running. A client
chats at 20 requests a second throughout; a request counts as lost when no server answered it (a load balancer's
usual rule: a refused connection goes to the next server, a request cut mid-way is lost)."""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass, field

import httpx
import psutil
import pytest
import redis

from aimind.beat import LOCK_KEY
from tests.e2e.system import start_extra_worker, start_system, wait_until
from tests.fixtures.postgres_cluster import start_postgres
from tests.fixtures.redis_server import RedisServer, redis_server

RATE = 20.0  # requests a second
CHAT = {"model": "ha-chat", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}


@dataclass
class Pair:
    servers: list
    worker: object
    postgres: object
    redis: RedisServer
    key: str
    model_id: int
    events: list = field(default_factory=list)

    def client(self, server: int = 0) -> httpx.Client:
        return self.servers[server].client()

    def instance(self) -> dict:
        with self.client(1) as c:
            [instance] = c.get(f"/api/v1/models/{self.model_id}/instances").json()
        return instance


class Chatter:
    """Chats at RATE per second through the servers in turn, passing a refused connection to the next server."""

    def __init__(self, urls: list[str], key: str) -> None:
        self.urls, self.key = urls, key
        self.results: list[tuple[float, str]] = []  # (time, "ok" or why it failed)
        self.slowest = 0.0  # seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Chatter:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        clients = [httpx.Client(base_url=url, timeout=10, headers={"Authorization": f"Bearer {self.key}"})
                   for url in self.urls]
        turn, began = 0, time.monotonic()
        n = 0
        while not self._stop.is_set():
            n += 1
            turn += 1
            sent = time.monotonic()
            self.results.append((sent, self._one(clients, turn)))
            self.slowest = max(self.slowest, time.monotonic() - sent)
            pause = began + n / RATE - time.monotonic()
            if pause > 0:
                self._stop.wait(pause)
        for client in clients:
            client.close()

    @staticmethod
    def _one(clients: list[httpx.Client], turn: int) -> str:
        problem = "no server"
        for k in range(len(clients)):
            client = clients[(turn + k) % len(clients)]
            try:
                response = client.post("/v1/chat/completions", json=CHAT)
            except httpx.ConnectError as exc:
                problem = f"refused: {exc}"
                continue  # never reached that server: the next one may answer
            except httpx.HTTPError as exc:
                return f"cut: {exc!r}"
            if response.status_code == 200 and response.json()["choices"]:
                return "ok"
            return f"{response.status_code}: {response.text[:200]}"
        return problem

    def failures(self) -> list[tuple[float, str]]:
        return [r for r in self.results if r[1] != "ok"]


@pytest.fixture(scope="module")
def pair(tmp_path_factory, tiny_models):
    tmp = tmp_path_factory.mktemp("ha")
    postgres = start_postgres()
    servers, worker = [], None
    try:
        with redis_server(tmp) as broker:
            shared = {"REDIS_URL": broker.url, "AIMIND_TOKEN": "ha-cluster-token", "AIMIND_SECRET_KEY": "ha-secret" * 8,
                      "AIMIND_BEAT_LOCK_TTL": "3", "AIMIND_BACKEND_PROBE_TIMEOUT": "1"}
            for name in ("a", "b"):
                (tmp / name).mkdir()
                servers.append(start_system(tmp / name, command="server", extra_env=shared,
                                            database_url=postgres.url))
            servers[1].api_key = servers[0].api_key  # one database: one key works on both
            worker = start_extra_worker(servers[0], "ha-worker", tmp,
                                        server_url=f"{servers[0].base_url},{servers[1].base_url}")
            with servers[0].client() as c:
                wait_until(lambda: any(w["state"] == "ready" for w in c.get("/api/v1/workers").json()), 60,
                           "the worker to join")
                created = c.post("/api/v1/models", json={
                    "name": "ha-chat", "source": "local_path", "local_path": str(tiny_models["chat"]),
                    "backend_parameters": ["--ctx-size", "256"]})
                assert created.status_code == 201, created.text
            found = Pair(servers, worker, postgres, broker, servers[0].api_key, created.json()["id"])
            servers[1].wait_for_instances(found.model_id, "running")
            yield found
    finally:
        if worker is not None:
            worker.send_signal(signal.SIGCONT)
            worker.terminate()
            worker.wait(30)
        for server in servers:
            if server.popen.poll() is None:
                server.stop()
        postgres.remove()


def test_a_worker_whose_heartbeats_stop_but_whose_backend_answers_is_not_rescheduled(pair):
    before = pair.instance()
    os.kill(pair.worker.pid, signal.SIGSTOP)  # the agent hangs; its backend runs in a session of its own
    try:
        with Chatter([s.base_url for s in pair.servers], pair.key) as chatter:
            with pair.client(1) as c:
                wait_until(lambda: c.get("/api/v1/workers").json()[0]["state"] == "not_ready", 30,
                           "the silent worker to be not ready")
                time.sleep(8)  # several more rounds of the beat's check (every 2 s here)
                [worker] = c.get("/api/v1/workers").json()
        assert "still answer the server's health probe" in worker["state_message"]
        after = pair.instance()
        assert (after["state"], after["worker_name"], after["port"]) == ("running", before["worker_name"],
                                                                         before["port"])
        assert not chatter.failures()
        assert len(chatter.results) > 100
    finally:
        os.kill(pair.worker.pid, signal.SIGCONT)
    with pair.client(0) as c:
        wait_until(lambda: c.get("/api/v1/workers").json()[0]["state"] == "ready", 30, "the worker back")


def test_postgres_down_for_30_seconds_costs_no_request_for_a_running_model(pair):
    usage_before = _requests_counted(pair)
    with Chatter([s.base_url for s in pair.servers], pair.key) as chatter:
        time.sleep(3)
        stopped = time.monotonic()
        pair.postgres.stop()
        time.sleep(30)
        pair.postgres.start()
        restarted = time.monotonic()
        with pair.client(1) as c:  # the API answers again (it needs the database)
            wait_until(lambda: _status(c, "/api/v1/models") == 200, 60, "the API after the outage")
        time.sleep(3)
    during = [r for r in chatter.results if stopped <= r[0] <= restarted]
    print(f"\nPostgreSQL down {restarted - stopped:.0f} s: {len(during)} requests during it, "
          f"{len(chatter.failures())} of {len(chatter.results)} failed, slowest answer {chatter.slowest * 1000:.0f} ms")
    assert len(during) >= 100  # the client kept asking throughout (its pace depends on the machine)
    assert not chatter.failures(), chatter.failures()[:5]
    # Nothing was forgotten: the gateway's counts from the outage reach the database once it is back.
    wait_until(lambda: _requests_counted(pair) >= usage_before + len(chatter.results), 60,
               "the outage's requests in the usage table")
    instance = pair.instance()
    assert instance["state"] == "running"


def test_redis_down_costs_no_request_for_a_running_model(pair):
    with Chatter([s.base_url for s in pair.servers], pair.key) as chatter:
        time.sleep(2)
        stopped = time.monotonic()
        pair.redis.stop()  # the broker, the channel layer, the gateway's change counter, the rate counters
        time.sleep(15)
        pair.redis.start()
        restarted = time.monotonic()
        time.sleep(3)
    during = [r for r in chatter.results if stopped <= r[0] <= restarted]
    print(f"\nRedis down {restarted - stopped:.0f} s: {len(during)} requests during it, "
          f"{len(chatter.failures())} of {len(chatter.results)} failed, slowest answer {chatter.slowest * 1000:.0f} ms")
    assert len(during) >= 50
    assert not chatter.failures(), chatter.failures()[:5]
    with pair.client(1) as c:  # and once it is back, the control plane works again: an edit reaches the worker
        assert c.patch(f"/api/v1/models/{pair.model_id}", json={"replicas": 2}).status_code == 200
    pair.servers[0].wait_for_instances(pair.model_id, "running", count=2)
    with pair.client(1) as c:
        assert c.patch(f"/api/v1/models/{pair.model_id}", json={"replicas": 1}).status_code == 200
    wait_until(lambda: len(_instances(pair)) == 1, 60, "the model back to one replica")


def test_killing_one_server_leaves_the_other_serving_scheduling_and_beating(pair):
    doomed, survivor = pair.servers
    holder = redis.Redis.from_url(pair.redis.url)
    wait_until(lambda: holder.get(LOCK_KEY), 10, "a beat to lead")
    with Chatter([s.base_url for s in pair.servers], pair.key) as chatter:
        time.sleep(3)
        killed_at = time.monotonic()
        _kill_everything(doomed)
        time.sleep(5)
    lost = chatter.failures()
    print(f"\none of two servers killed: {len(lost)} of {len(chatter.results)} requests lost "
          f"({sum(1 for r in chatter.results if r[0] >= killed_at)} after the kill)")
    assert not [r for r in lost if not r[1].startswith("cut")], lost[:5]  # only requests in flight on it, if any
    assert len(lost) <= 2
    with survivor.client() as c:  # the survivor schedules: a second replica is placed and runs
        assert c.patch(f"/api/v1/models/{pair.model_id}", json={"replicas": 2}).status_code == 200
        survivor.wait_for_instances(pair.model_id, "running", count=2)
        assert c.post("/v1/chat/completions", json=CHAT).status_code == 200
    beats = {p.pid for p in _tree(survivor.popen.pid) if "beat" in " ".join(p.cmdline())}
    wait_until(lambda: int((holder.get(LOCK_KEY) or b"::").decode().split(":")[1] or 0) in beats, 30,
               "the surviving server's beat to lead")
    holder.close()


def _instances(pair: Pair) -> list[dict]:
    with pair.client(1) as c:
        return c.get(f"/api/v1/models/{pair.model_id}/instances").json()


def _status(client: httpx.Client, path: str) -> int:
    try:
        return client.get(path).status_code
    except httpx.HTTPError:
        return 0


def _requests_counted(pair: Pair) -> int:
    with pair.client(1) as c:
        return sum(row["requests"] for row in c.get("/api/v1/keys/usage", params={"model": "ha-chat"}).json()["models"])


def _tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return []
    return [root, *root.children(recursive=True)]


def _kill_everything(system) -> None:
    """Like a machine dying: every process of that server at once, none given the chance to clean up."""
    for proc in _tree(system.popen.pid):
        try:
            proc.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            continue
    system.popen.wait(10)
