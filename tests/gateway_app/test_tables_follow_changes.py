"""The gateway answers from memory, yet follows the database: a revoked key stops working, a new model or instance
is routed to, within a second, in every web process (they watch a version in Redis); with Redis gone the last
tables keep serving."""

import asyncio
import time

import pytest
import redis
from asgiref.sync import async_to_sync, sync_to_async
from django.utils import timezone

from gateway_app import changes
from gateway_app.models import ApiKey, hash_key
from gateway_app.proxy import lifespan
from gateway_app.tables import TABLES
from tests.gateway_app.fake_backend import APP, call, deploy, free_port

pytestmark = pytest.mark.django_db


def models_status(key: str) -> int:
    return async_to_sync(call)(APP, "GET", "/v1/models", key=key)["status"]


def poll(predicate, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_a_key_revoked_here_stops_within_a_second_without_redis(admin_user, api):
    issued = api.post("/api/v1/keys", {"name": "ci", "scope": "inference"}, format="json").json()
    assert models_status(issued["key"]) == 200
    assert api.delete(f"/api/v1/keys/{issued['id']}").status_code == 204
    # This process knows of its own change: it reloads in the background (requests meanwhile answer from the
    # tables at hand, never waiting for the database).
    poll(lambda: models_status(issued["key"]) == 401)


def test_a_key_revoked_by_another_process_stops_within_a_second(admin_user, redis_url):
    key, raw = ApiKey.issue(admin_user, "ci")
    assert models_status(raw) == 200
    # Another process revokes it: the row changes and, once committed, that process bumps the version in Redis.
    ApiKey.objects.filter(pk=key.pk).update(revoked_at=timezone.now())
    assert models_status(raw) == 200  # this process has not been told yet
    redis.Redis.from_url(redis_url).incr(changes.VERSION_KEY)
    poll(lambda: models_status(raw) == 401)


def test_an_expired_key_stops_without_any_change(admin_user):
    _, raw = ApiKey.issue(admin_user, "brief", expires_at=timezone.now() + timezone.timedelta(seconds=0.5))
    assert models_status(raw) == 200
    poll(lambda: models_status(raw) == 401)


def test_a_committed_change_bumps_the_version_in_redis(admin_user, redis_url, django_capture_on_commit_callbacks):
    client = redis.Redis.from_url(redis_url)
    before = int(client.get(changes.VERSION_KEY) or 0)
    with django_capture_on_commit_callbacks(execute=True):
        deploy("tiny", [free_port()])
    assert int(client.get(changes.VERSION_KEY)) > before


def test_a_key_made_where_redis_was_out_of_reach_works_on_first_use(admin_user, redis_url):
    _, first = ApiKey.issue(admin_user, "first")
    assert models_status(first) == 200
    time.sleep(1.0)  # a key not found reloads the tables, at most once a second
    # bulk_create sends no post_save: as if made by a process that bumped nothing.
    ApiKey.objects.bulk_create([ApiKey(name="new", user=admin_user, key_hash=hash_key("aimind-new"),
                                       key_prefix="aimind-new")])
    assert models_status("aimind-new") == 200


def test_with_redis_gone_the_last_tables_keep_serving(admin_user, redis_url, settings):
    _, raw = ApiKey.issue(admin_user, "ci")
    assert models_status(raw) == 200
    settings.REDIS_URL = f"redis://127.0.0.1:{free_port()}/0"
    time.sleep(0.2)
    assert models_status(raw) == 200


def test_the_lifespan_loads_the_tables_and_keeps_them_current(admin_user, redis_url):
    key, raw = ApiKey.issue(admin_user, "ci")

    def revoked_elsewhere():
        ApiKey.objects.filter(pk=key.pk).update(revoked_at=timezone.now())
        redis.Redis.from_url(redis_url).incr(changes.VERSION_KEY)

    @async_to_sync
    async def run():
        inbox: asyncio.Queue = asyncio.Queue()
        said: list = []

        async def send(message):
            said.append(message["type"])

        await inbox.put({"type": "lifespan.startup"})
        serving = asyncio.ensure_future(lifespan({"type": "lifespan"}, inbox.get, send))
        while not said:
            await asyncio.sleep(0.01)
        loaded = TABLES.snapshot.key(raw) is not None
        await sync_to_async(revoked_elsewhere)()
        for _ in range(500):  # the watcher notices, no request needed
            if TABLES.snapshot.key(raw) is None:
                break
            await asyncio.sleep(0.01)
        noticed = TABLES.snapshot.key(raw) is None
        await inbox.put({"type": "lifespan.shutdown"})
        await serving
        return loaded, noticed, said

    loaded, noticed, said = run()
    assert loaded and noticed
    assert said == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
