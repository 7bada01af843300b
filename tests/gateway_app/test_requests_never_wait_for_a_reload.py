"""Once a web process has its tables, a request with a valid key for a model that runs never waits for the database:
a slow reload (the watcher's, after a change made in this process, or a look for an unknown key) goes on beside it;
and keys or models not found make the process look again at most once a second."""

import asyncio
import threading
import time

import pytest
from asgiref.sync import async_to_sync, sync_to_async

from gateway_app import tables
from gateway_app.models import ApiKey
from gateway_app.tables import TABLES
from tests.gateway_app.fake_backend import APP, CHAT, FakeBackend, call, deploy, free_port, serving

pytestmark = pytest.mark.django_db


async def until(predicate, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("slow_load", ["watcher's periodic reload", "change made here", "unknown key"])
def test_a_valid_request_answers_while_a_slow_reload_is_under_way(admin_user, monkeypatch, settings, slow_load):
    settings.GATEWAY_REFRESH_INTERVAL, settings.GATEWAY_RELOAD_EVERY = 0.01, 0.1
    key = ApiKey.issue(admin_user, "k")[1]
    reading, release = threading.Event(), threading.Event()
    read_rows = tables.read_rows

    @async_to_sync
    async def run():
        loop = asyncio.get_running_loop()
        async with serving("tiny", FakeBackend()):
            assert (await call(APP, "POST", "/v1/chat/completions", key=key, json_body=CHAT))["status"] == 200
            if slow_load == "change made here":
                await sync_to_async(deploy)("other", [free_port()])
            rows = await sync_to_async(read_rows)()

            def slow_database():
                reading.set()
                release.wait(60)  # the database hangs until the test has its answer
                return rows

            monkeypatch.setattr(tables, "read_rows", slow_database)
            before, background = TABLES.snapshot, []
            if slow_load == "unknown key":
                TABLES.loaded_at -= 2  # due for a look when a key is not found
                background.append(loop.create_task(call(APP, "GET", "/v1/models", key="aimind-unknown")))
            else:
                background.append(loop.create_task(TABLES.watch()))
            try:
                await until(reading.is_set, "a reload reads the database")
                TABLES.checked_at = -1e9  # and a check is due (as when the watcher is late): it too goes on beside
                answer = await asyncio.wait_for(call(APP, "POST", "/v1/chat/completions", key=key,
                                                     json_body=CHAT), 30)
                answered_from = TABLES.snapshot
            finally:
                release.set()
            await until(lambda: TABLES.snapshot is not before, "the reload ends")
            for task in background:
                task.cancel()
            return answer, answered_from is before, TABLES.snapshot.routes

    answer, from_the_old_snapshot, routes = run()
    assert answer["status"] == 200 and from_the_old_snapshot
    assert ("other" in routes) == (slow_load == "change made here")


def test_keys_not_found_make_the_process_look_again_at_most_once_a_second(admin_user, monkeypatch):
    key = ApiKey.issue(admin_user, "k")[1]
    reads = []
    read_rows = tables.read_rows

    def counted():
        reads.append(1)
        return read_rows()

    @async_to_sync
    async def run():
        async with serving("tiny", FakeBackend()):
            assert (await call(APP, "POST", "/v1/chat/completions", key=key, json_body=CHAT))["status"] == 200
            monkeypatch.setattr(tables, "read_rows", counted)
            monkeypatch.setattr(tables, "RECHECK_EVERY", 3600.0)  # "a second" that cannot pass during the test
            TABLES.loaded_at -= 7200
            unknown = [await call(APP, "GET", "/v1/models", key=f"aimind-guess-{n}") for n in range(20)]
            valid = await call(APP, "POST", "/v1/chat/completions", key=key, json_body=CHAT)
        return [a["status"] for a in unknown], valid["status"]

    unknown, valid = run()
    assert unknown == [401] * 20 and valid == 200
    assert len(reads) == 1
