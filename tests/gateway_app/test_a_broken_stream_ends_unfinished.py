"""A backend that breaks off a stream mid-way (it crashed, its connection dropped) does not make the client's
answer look complete: the client gets an error event in OpenAI's shape, then the connection closes before the
body's end (no [DONE], no last chunk), as uvicorn serves the gateway."""

import json
import logging
from contextlib import asynccontextmanager

import httpx
import pytest
from asgiref.sync import async_to_sync

from gateway_app import usage
from gateway_app.models import ApiKey
from tests.gateway_app.fake_backend import CHAT, FakeBackend, serving, uvicorn_serving

pytestmark = pytest.mark.django_db


@asynccontextmanager
async def gateway(key: str):
    """The gateway served by uvicorn (its errors logged), and an httpx client for it."""
    async with uvicorn_serving(log_level="error") as url, \
            httpx.AsyncClient(base_url=url, headers={"authorization": f"Bearer {key}"}) as client:
        yield client


@pytest.mark.parametrize("usage_asked", [False, True])
def test_a_stream_the_backend_breaks_off_reaches_the_client_unfinished(admin_user, usage_asked, caplog):
    key = ApiKey.issue(admin_user, "k")[1]
    backend = FakeBackend(stream_pieces=5, break_after_pieces=2)
    body = {**CHAT, "stream": True, **({"stream_options": {"include_usage": True}} if usage_asked else {})}

    @async_to_sync
    async def run():
        lines, status, error = [], None, None
        async with serving("tiny", backend), gateway(key) as client:
            # uvicorn's loggers, configured as its server starts, do not reach the root's handlers
            logging.getLogger("uvicorn.error").addHandler(caplog.handler)
            try:
                async with client.stream("POST", "/v1/chat/completions", json=body) as answer:
                    status = answer.status_code
                    async for line in answer.aiter_lines():
                        lines.append(line)
            except httpx.RemoteProtocolError as exc:
                error = exc
        return status, [line for line in lines if line], error

    status, events, error = run()
    assert status == 200
    assert isinstance(error, httpx.RemoteProtocolError)  # the body ended before its end
    assert [json.loads(e[6:])["choices"][0]["delta"]["content"] for e in events[:2]] == ["piece 0 ", "piece 1 "]
    assert len(events) == 3 and json.loads(events[2][6:]) == {"error": {
        "message": "The instance serving 'tiny' broke off its answer.", "type": "api_error",
        "code": "upstream_unreachable"}}
    assert usage.METER.served[("tiny", "5xx")][0] == 1  # counted as the backend's failure
    logging.getLogger("uvicorn.error").removeHandler(caplog.handler)
    assert [r.getMessage() for r in caplog.records if r.name == "uvicorn.error"] == []  # no traceback on the console
    assert any("broke off its stream" in r.getMessage() for r in caplog.records)  # the gateway's one warning


def test_a_messages_stream_the_backend_breaks_off_ends_with_an_error_event_unfinished(admin_user):
    """llama-server's own Messages stream, passed on as it comes: cut off, it ends with an error event in
    Anthropic's shape and no message_stop, and the connection closes before the body's end."""
    key = ApiKey.issue(admin_user, "k")[1]
    backend = FakeBackend(stream_pieces=5, break_after_pieces=3)
    body = {"model": "tiny", "max_tokens": 16, "stream": True, "messages": [{"role": "user", "content": "hi"}]}

    @async_to_sync
    async def run():
        lines, status, error = [], None, None
        async with serving("tiny", backend), gateway(key) as client:
            try:
                async with client.stream("POST", "/v1/messages", json=body) as answer:
                    status = answer.status_code
                    async for line in answer.aiter_lines():
                        lines.append(line)
            except httpx.RemoteProtocolError as exc:
                error = exc
        return status, [json.loads(line[6:]) for line in lines if line.startswith("data: ")], error

    status, events, error = run()
    assert status == 200
    assert isinstance(error, httpx.RemoteProtocolError)
    assert [e["type"] for e in events] == ["message_start", "content_block_start", "content_block_delta", "error"]
    assert events[-1]["error"] == {"type": "api_error", "message": "The backend broke off its answer."}
    assert usage.METER.served[("tiny", "5xx")][0] == 1


def test_a_translated_messages_stream_the_backend_breaks_off_ends_with_an_error_event_unfinished(admin_user):
    """vLLM's chat stream, translated to Messages events: cut off, the same end (error event, no message_stop,
    the connection closed before the body's end), counted as the backend's failure."""
    key = ApiKey.issue(admin_user, "k")[1]
    backend = FakeBackend(stream_pieces=5, break_after_pieces=2)
    body = {"model": "big", "max_tokens": 16, "stream": True, "messages": [{"role": "user", "content": "hi"}]}

    @async_to_sync
    async def run():
        lines, error = [], None
        async with serving("big", backend, backend="vllm"), gateway(key) as client:
            try:
                async with client.stream("POST", "/v1/messages", json=body) as answer:
                    async for line in answer.aiter_lines():
                        lines.append(line)
            except httpx.RemoteProtocolError as exc:
                error = exc
        return [json.loads(line[6:]) for line in lines if line.startswith("data: ")], error

    events, error = run()
    assert isinstance(error, httpx.RemoteProtocolError)
    assert events[0]["type"] == "message_start" and events[-1]["type"] == "error"
    assert "message_stop" not in [e["type"] for e in events]
    assert [e["delta"]["text"] for e in events if e["type"] == "content_block_delta"] == ["piece 0 ", "piece 1 "]
    assert usage.METER.served[("big", "5xx")][0] == 1
