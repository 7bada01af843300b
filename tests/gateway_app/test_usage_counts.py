"""Each answer's tokens (the backend's `usage`; in a stream its last `usage`, else llama.cpp's `timings`) are counted
per model and per key, written in batches, and read at /api/v1/keys/usage."""

import pytest
from asgiref.sync import async_to_sync, sync_to_async

from gateway_app import usage
from gateway_app.models import ApiKey, Usage
from gateway_app.proxy import flush_usage
from tests.gateway_app.fake_backend import APP, CHAT, FakeBackend, call, deploy, serving

pytestmark = pytest.mark.django_db


def test_tokens_are_read_from_usage_or_else_timings():
    assert usage.tokens_in(b'{"id": 1, "usage": {"prompt_tokens": 4, "completion_tokens": 9, '
                           b'"prompt_tokens_details": {"cached_tokens": 0}}, "timings": {"prompt_n": 1}}') == (4, 9)
    assert usage.tokens_in(b'data: {"choices": [], "timings": {"prompt_n": 3, "predicted_n": 16}}\n\n'
                           b'data: [DONE]\n\n') == (3, 16)
    assert usage.tokens_in(b'{"data": [{"embedding": [0.1]}], "usage": {"prompt_tokens": 2, "total_tokens": 2}}') \
        == (2, 0)
    assert usage.tokens_in(b'{"content": "say \\"usage\\": {}"}') == (0, 0)
    assert usage.tokens_in(b'"usage": {"prompt_tokens": "many"') == (0, 0)


def test_usage_is_counted_per_model_and_key_and_readable_from_the_api(admin_user, api):
    first, raw_first = ApiKey.issue(admin_user, "first")
    second, raw_second = ApiKey.issue(admin_user, "second", scope="inference")

    @async_to_sync
    async def run():
        backend = FakeBackend(stream_pieces=4)
        async with serving("tiny", backend):
            await sync_to_async(deploy)("other", [backend.port])
            for body in (CHAT, CHAT, {**CHAT, "stream": True, "stream_options": {"include_usage": True}},
                         {**CHAT, "stream": True}):
                assert (await call(APP, "POST", "/v1/chat/completions", key=raw_first, json_body=body))["status"] \
                    == 200
            await call(APP, "POST", "/v1/chat/completions", key=raw_second, json_body={**CHAT, "model": "other"})
            await call(APP, "GET", "/v1/models", key=raw_second)
            await flush_usage()

    run()
    rows = {(u.api_key_id, u.model_name): (u.requests, u.prompt_tokens, u.completion_tokens)
            for u in Usage.objects.all()}
    # The stream that did not ask for usage is counted by it too: the gateway asked the backend for it.
    assert rows == {(first.pk, "tiny"): (4, 5 * 4, 7 * 4), (second.pk, "other"): (1, 5, 7)}
    assert ApiKey.objects.get(pk=second.pk).last_used_at is not None
    answer = api.get("/api/v1/keys/usage").json()
    assert {m["model"]: m["requests"] for m in answer["models"]} == {"other": 1, "tiny": 4}
    assert {k["name"]: k["prompt_tokens"] for k in answer["keys"]} == {"first": 20, "second": 5}
    assert [d["completion_tokens"] for d in answer["days"]] == [35]
    only = api.get("/api/v1/keys/usage", {"model": "other", "key": second.pk}).json()
    assert [m["model"] for m in only["models"]] == ["other"]
    assert api.get("/api/v1/keys/usage", {"since": "not a day"}).status_code == 400


def test_batches_from_several_processes_add_up(admin_user):
    key, _ = ApiKey.issue(admin_user, "k")
    for _ in range(2):  # two web processes, each with its own counts
        meter = usage.Meter()
        meter.note_answer(key.pk, "tiny", 3, 4)
        usage.write(*meter.take())
    assert Usage.objects.get().requests == 2 and Usage.objects.get().completion_tokens == 8


def test_a_failed_write_keeps_the_counts_for_the_next(admin_user, monkeypatch):
    key, _ = ApiKey.issue(admin_user, "k")
    usage.METER.note_answer(key.pk, "tiny", 3, 4)

    def broken(*args):
        raise RuntimeError("database is locked")

    monkeypatch.setattr(usage, "write", broken)
    async_to_sync(flush_usage)()
    assert usage.METER.counts
    monkeypatch.undo()
    async_to_sync(flush_usage)()
    assert Usage.objects.get().prompt_tokens == 3 and not usage.METER.counts


def test_a_key_s_last_use_only_moves_forward_whichever_process_writes_last(admin_user):
    key, _ = ApiKey.issue(admin_user, "k")
    later, earlier = 1_800_000_100.0, 1_800_000_000.0
    usage.write({}, {key.pk: later})  # one web process flushes its newer mark first
    usage.write({}, {key.pk: earlier})  # another, holding an older one, flushes after it
    assert ApiKey.objects.get(pk=key.pk).last_used_at.timestamp() == later
    usage.write({}, {key.pk: later + 5})
    assert ApiKey.objects.get(pk=key.pk).last_used_at.timestamp() == later + 5
