"""A client that hangs up ends the backend's work at once: the gateway closes its connection to the backend, which
is how llama-server learns to stop generating."""

import asyncio

import pytest
from asgiref.sync import async_to_sync

from gateway_app.models import ApiKey, Usage
from gateway_app.proxy import flush_usage
from gateway_app.tables import TABLES
from tests.gateway_app.fake_backend import APP, CHAT, FakeBackend, call, serving

pytestmark = pytest.mark.django_db


async def _until(predicate, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


@pytest.mark.parametrize(("body", "leaving", "answered"), [
    ({**CHAT, "stream": True}, {"leave_after_pieces": 2}, 200),  # mid-stream
    (CHAT, {"leave_after": 0.2}, None),  # before a plain answer (nothing is answered to a client that has gone)
])
def test_hanging_up_closes_the_backends_request(admin_user, body, leaving, answered):
    key = ApiKey.issue(admin_user, "k")[1]

    @async_to_sync
    async def run():
        backend = FakeBackend(stream_pieces=50, piece_delay=0.05, answer_delay=1.0)
        async with serving("tiny", backend):
            answer = await call(APP, "POST", "/v1/chat/completions", key=key, json_body=body, **leaving)
            await _until(lambda: backend.hung_up == 1)
        return answer, backend.pieces_sent

    answer, sent = run()
    assert answer["status"] == answered and sent < 50
    assert TABLES.snapshot.routes["tiny"].replicas[0].outstanding == 0


def test_a_stream_passes_through_piece_by_piece(admin_user):
    key = ApiKey.issue(admin_user, "k")[1]

    @async_to_sync
    async def run():
        backend = FakeBackend(stream_pieces=4, piece_delay=0.05)
        async with serving("tiny", backend):
            return await call(APP, "POST", "/v1/chat/completions", key=key, json_body={**CHAT, "stream": True})

    answer = run()
    assert answer["status"] == 200 and answer["headers"]["content-type"] == "text/event-stream"
    assert len(answer["pieces"]) >= 5  # four pieces and [DONE], each as it came
    assert answer["body"].rstrip().endswith(b"data: [DONE]")


def test_a_stream_the_client_leaves_still_counts_the_tokens_it_was_sent(admin_user):
    """Else opening streams and leaving before their usage event would dodge a key's token limits."""
    key = ApiKey.issue(admin_user, "k")[1]

    @async_to_sync
    async def run():
        backend = FakeBackend(stream_pieces=50, piece_delay=0.05)
        async with serving("tiny", backend):
            await call(APP, "POST", "/v1/chat/completions", key=key, json_body={**CHAT, "stream": True},
                       leave_after_pieces=3)
            await _until(lambda: backend.hung_up == 1)
            await flush_usage()

    run()
    [row] = Usage.objects.filter(model_name="tiny")
    assert row.requests == 1 and 3 <= row.completion_tokens < 50
