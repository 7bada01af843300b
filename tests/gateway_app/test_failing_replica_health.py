"""A replica whose connections keep failing is passed over until its backend's health check passes again: the web
process asks that check in the background, and stops asking once the replica is back, gone from the tables, or the
process shuts down."""

import asyncio
import json
import time

import pytest
from asgiref.sync import async_to_sync, sync_to_async

from gateway_app import routing
from gateway_app.models import ApiKey
from gateway_app.proxy import lifespan
from gateway_app.tables import TABLES
from models_app.models import ModelInstance
from tests.gateway_app.fake_backend import APP, CHAT, FakeBackend, call, free_port, serving

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def quick_health_checks(monkeypatch, settings):
    settings.GATEWAY_REPLICA_FAILURES = 3
    monkeypatch.setattr(routing, "HEALTH_CHECK_EVERY", 0.02)


async def until(predicate, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        await asyncio.sleep(0.01)


def replica_at(port: int):
    return next(r for r in TABLES.snapshot.routes["tiny"].replicas if r.port == port)


async def chats(key: str, count: int) -> list[dict]:
    return [await call(APP, "POST", "/v1/chat/completions", key=key, json_body=CHAT) for _ in range(count)]


def test_a_refusing_replica_is_passed_over_until_its_health_check_passes(admin_user):
    key = ApiKey.issue(admin_user, "k")[1]
    port = free_port()
    live, revived = FakeBackend("live"), FakeBackend("revived", health_status=503)

    @async_to_sync
    async def run():
        async with serving("tiny", port, live):
            refusing = await chats(key, 10)
            replica = replica_at(port)
            skipped = bool(replica.skipped_at)
            await revived.start(port)  # it listens again, but still loads: /health answers 503
            try:
                await until(lambda: revived.health_checks >= 3, "its health check was asked (and failed) 3 times")
                loading = await chats(key, 6)
                still_skipped = bool(replica.skipped_at)
                revived.health_status = 200
                await until(lambda: not replica.skipped_at, "the replica is back")
                await until(replica.health_check.done, "its health check stopped")
                checks_when_back = revived.health_checks
                back = await chats(key, 6)
            finally:
                await revived.stop()
        return refusing, skipped, loading, still_skipped, back, checks_when_back

    refusing, skipped, loading, still_skipped, back, checks_when_back = run()
    assert [a["status"] for a in refusing + loading + back] == [200] * 22
    assert skipped and still_skipped
    # While its health check failed, nothing but that check reached it, though it accepted connections.
    assert {json.loads(a["body"])["served_by"] for a in loading} == {"live"}
    assert [json.loads(a["body"])["served_by"] for a in back].count("revived") == 3  # equally busy: in turn
    assert len(revived.received) == 3 and revived.health_checks == checks_when_back


def test_the_health_check_of_a_replica_that_left_the_tables_stops(admin_user):
    key = ApiKey.issue(admin_user, "k")[1]
    port = free_port()

    @async_to_sync
    async def run():
        async with serving("tiny", port, FakeBackend("live")):
            await chats(key, 10)
            replica = replica_at(port)
            checking = not replica.health_check.done()
            await sync_to_async(ModelInstance.objects.filter(port=port).delete)()
            await chats(key, 1)  # this process deleted it: the tables follow
            await until(replica.health_check.done, "its health check stopped")
            listed = [r.port for r in TABLES.snapshot.routes["tiny"].replicas]
        return replica, checking, listed

    replica, checking, listed = run()
    assert checking and port not in listed
    assert replica.skipped_at  # it was never let back: it just left
    assert not routing._health_checks


def test_health_checks_stop_when_the_process_shuts_down(admin_user):
    key = ApiKey.issue(admin_user, "k")[1]
    port = free_port()

    @async_to_sync
    async def run():
        inbox: asyncio.Queue = asyncio.Queue()
        said: list = []

        async def send(message):
            said.append(message["type"])

        async with serving("tiny", port, FakeBackend("live")):
            await inbox.put({"type": "lifespan.startup"})
            served = asyncio.ensure_future(lifespan({"type": "lifespan"}, inbox.get, send))
            await until(lambda: said, "the lifespan started")
            await chats(key, 10)
            task = replica_at(port).health_check
            running = not task.done()
            await inbox.put({"type": "lifespan.shutdown"})
            await served
            await until(task.done, "the health check ended")
        return running, task, said

    running, task, said = run()
    assert running and task.cancelled()
    assert said == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
