"""The gateway reaches a backend over keep-alive connections: reused while busy, let go soon when idle (each holds
one of llama-server's HTTP threads), and a connection the backend closed without saying so costs no request."""

import asyncio

import pytest
from asgiref.sync import async_to_sync

from gateway_app import upstream
from gateway_app.models import ApiKey
from tests.gateway_app.fake_backend import APP, CHAT, FakeBackend, call, serving

pytestmark = pytest.mark.django_db


def test_requests_in_a_row_share_one_connection_which_is_let_go_when_idle(admin_user, monkeypatch):
    monkeypatch.setattr(upstream, "IDLE_TIMEOUT", 0.1)
    key = ApiKey.issue(admin_user, "k")[1]

    @async_to_sync
    async def run():
        backend = FakeBackend()
        async with serving("tiny", backend):
            answers = [await call(APP, "POST", "/v1/chat/completions", key=key, json_body=CHAT) for _ in range(5)]
            open_after_answers = backend.open_connections
            for _ in range(100):
                if not backend.open_connections:
                    break
                await asyncio.sleep(0.02)
        return answers, backend.connections, open_after_answers, backend.open_connections

    answers, connections, open_after_answers, open_at_last = run()
    assert [a["status"] for a in answers] == [200] * 5
    assert connections == 1 and open_after_answers == 1 and open_at_last == 0


def test_a_connection_the_backend_closed_after_answering_costs_no_request(admin_user):
    key = ApiKey.issue(admin_user, "k")[1]

    @async_to_sync
    async def run():
        backend = FakeBackend(close_after_answer=True)
        async with serving("tiny", backend):
            return [await call(APP, "POST", "/v1/chat/completions", key=key, json_body={**CHAT, "stream": s})
                    for s in (True, False, True, True, False)], backend.connections

    answers, connections = run()
    assert [a["status"] for a in answers] == [200] * 5 and connections == 5
