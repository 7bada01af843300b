"""The gateway records each model's last request (what "idle" is measured from): kept in memory, written by the usage
flush to `Model.last_request_at`, never moved backwards by a process with an older time."""

import asyncio
from datetime import UTC, datetime, timedelta

import pytest
from asgiref.sync import async_to_sync, sync_to_async
from django.utils import timezone

from gateway_app import usage
from gateway_app.models import ApiKey
from gateway_app.proxy import flush_usage
from models_app.models import Model
from tests.gateway_app.fake_backend import APP, CHAT, FakeBackend, call, serving

pytestmark = pytest.mark.django_db


def test_a_served_request_sets_the_models_last_request_at_the_next_flush(admin_user):
    key = ApiKey.issue(admin_user, "k")[1]

    @async_to_sync
    async def run():
        async with serving("tiny", FakeBackend()):
            answer = await call(APP, "POST", "/v1/chat/completions", key=key, json_body=CHAT)
            await flush_usage()
        return answer

    before = timezone.now()
    assert run()["status"] == 200
    stored = Model.objects.get(name="tiny").last_request_at
    assert stored is not None and before - timedelta(seconds=1) <= stored <= timezone.now()


def test_an_older_time_never_replaces_a_newer_one():
    newer = timezone.now() + timedelta(minutes=5)  # another process's flush, with a later request
    Model.objects.create(name="tiny", source="local_path", local_path="/m.gguf", last_request_at=newer)
    Model.objects.create(name="other", source="local_path", local_path="/m.gguf")
    usage.METER.note_served("tiny", 200, 0.01)
    usage.METER.note_served("other", 200, 0.01)

    async_to_sync(flush_usage)()

    assert Model.objects.get(name="tiny").last_request_at == newer
    assert Model.objects.get(name="other").last_request_at is not None


def test_a_failed_write_keeps_the_times_for_the_next_flush(monkeypatch):
    Model.objects.create(name="tiny", source="local_path", local_path="/m.gguf")
    usage.METER.note_served("tiny", 200, 0.01)
    noted = usage.METER.requested["tiny"]

    def refuse(requested):
        raise OSError("database unreachable")

    monkeypatch.setattr("gateway_app.waking._write_last_requests", refuse)
    async_to_sync(flush_usage)()
    assert Model.objects.get(name="tiny").last_request_at is None
    monkeypatch.undo()
    async_to_sync(flush_usage)()
    assert Model.objects.get(name="tiny").last_request_at == datetime.fromtimestamp(noted, UTC)


def test_a_request_still_being_answered_counts_as_a_use_at_each_flush(admin_user):
    key = ApiKey.issue(admin_user, "k")[1]

    @async_to_sync
    async def run():
        async with serving("tiny", FakeBackend(answer_delay=1.0)):
            request = asyncio.ensure_future(call(APP, "POST", "/v1/chat/completions", key=key, json_body=CHAT))
            await asyncio.sleep(0.5)  # sent and not yet answered: a long generation
            usage.METER.requested.clear()
            await flush_usage()
            noted = await sync_to_async(lambda: Model.objects.get(name="tiny").last_request_at)()
            return noted, await request

    noted, answer = run()
    assert noted is not None  # written while it was in flight: the model does not fall asleep under it
    assert answer["status"] == 200
