"""Streamed chat completions are counted exactly: the gateway asks the backend for the stream's usage even when the
client did not, counts it, and keeps that usage-only event from the client that did not ask; a client that asked
gets it."""

import json

import pytest
from asgiref.sync import async_to_sync

from gateway_app.models import ApiKey, Usage
from gateway_app.proxy import flush_usage
from gateway_app.stream_usage import UsageFilter
from tests.gateway_app.fake_backend import APP, CHAT, FakeBackend, call, serving

pytestmark = pytest.mark.django_db


def events(body: bytes) -> list:
    return [json.loads(part[6:]) if part != b"data: [DONE]" else "[DONE]"
            for part in body.split(b"\n\n") if part]


def stream(raw: str, backend: FakeBackend, body: dict, route: str = "chat/completions") -> dict:
    @async_to_sync
    async def run():
        async with serving("tiny", backend):
            answer = await call(APP, "POST", f"/v1/{route}", key=raw, json_body=body)
            await flush_usage()
            return answer

    return run()


def test_a_stream_without_usage_asked_is_counted_by_the_backends_usage_and_shown_none(admin_user):
    key, raw = ApiKey.issue(admin_user, "k")
    backend = FakeBackend(stream_pieces=3)
    answer = stream(raw, backend, {**CHAT, "stream": True})
    assert answer["status"] == 200
    seen = events(answer["body"])
    assert [e["choices"][0]["delta"]["content"] for e in seen[:-1]] == ["piece 0 ", "piece 1 ", "piece 2 "]
    assert seen[-1] == "[DONE]" and b'"usage"' not in answer["body"]
    sent = json.loads(backend.received[0]["body"])
    assert sent["stream_options"] == {"include_usage": True} and sent["messages"] == CHAT["messages"]
    usage = Usage.objects.get(api_key=key)
    assert (usage.prompt_tokens, usage.completion_tokens) == (5, 7)  # the usage event's, not llama.cpp's timings


def test_a_streamed_completion_is_counted_exactly_too(admin_user):
    key, raw = ApiKey.issue(admin_user, "k")
    backend = FakeBackend(stream_pieces=3)
    answer = stream(raw, backend, {"model": "tiny", "prompt": "hi", "stream": True}, route="completions")
    assert answer["status"] == 200 and b'"usage"' not in answer["body"]
    assert json.loads(backend.received[0]["body"])["stream_options"] == {"include_usage": True}
    usage = Usage.objects.get(api_key=key)
    assert (usage.prompt_tokens, usage.completion_tokens) == (5, 7)


def test_a_client_that_asked_for_usage_gets_it_and_the_body_passes_unchanged(admin_user):
    key, raw = ApiKey.issue(admin_user, "k")
    backend = FakeBackend()
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    answer = stream(raw, backend, body)
    assert events(answer["body"])[-2] == {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 7,
                                                                   "total_tokens": 12}}
    assert backend.received[0]["body"] == json.dumps(body).encode()
    assert Usage.objects.get(api_key=key).completion_tokens == 7


def test_a_client_that_said_no_to_usage_is_counted_and_shown_none(admin_user):
    key, raw = ApiKey.issue(admin_user, "k")
    backend = FakeBackend()
    answer = stream(raw, backend, {**CHAT, "stream": True, "stream_options": {"include_usage": False}})
    assert b'"usage"' not in answer["body"] and events(answer["body"])[-1] == "[DONE]"
    assert json.loads(backend.received[0]["body"])["stream_options"] == {"include_usage": True}
    assert Usage.objects.get(api_key=key).prompt_tokens == 5


def test_the_usage_event_is_found_however_the_stream_is_cut():
    content = {"choices": [{"delta": {"content": 'a "usage" word'}}]}
    final = {"choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": 1}, "timings": {"prompt_n": 2}}
    whole = (f"data: {json.dumps(content)}\n\ndata: {json.dumps(final)}\n\ndata: [DONE]\n\n").encode()
    for size in (1, 7, 64, len(whole)):
        kept = UsageFilter()
        out = b"".join(kept.feed(whole[at:at + size]) for at in range(0, len(whole), size)) + kept.rest()
        assert out == f"data: {json.dumps(content)}\n\ndata: [DONE]\n\n".encode(), size
