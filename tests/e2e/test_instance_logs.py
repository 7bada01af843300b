"""Instance logs from Redis: the tail over HTTP, and the WebSocket's backlog followed by live lines."""

import httpx
import openai
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from tests.e2e.system import wait_until


@pytest.fixture(scope="module")
def logged(system, tiny_models):
    with system.client() as c:
        model = c.post("/api/v1/models", json={"name": "logged", "source": "local_path",
                                               "local_path": str(tiny_models["chat"]),
                                               "backend_parameters": ["--ctx-size", "256"]}).json()
    [instance] = system.wait_for_instances(model["id"], "running")
    yield instance
    with system.client() as c:
        c.delete(f"/api/v1/models/{model['id']}")


def ws_url(system, path):
    return system.base_url.replace("http://", "ws://") + path


def test_tail_returns_the_last_lines_as_text(system, logged):
    with system.client() as c:
        def tail():
            response = c.get(f"/api/v1/instances/{logged['id']}/logs", params={"tail": 3})
            return response if response.text.strip() else None

        response = wait_until(tail, 10, "log lines")
    assert response.headers["content-type"].startswith("text/plain")
    assert 1 <= len(response.text.splitlines()) <= 3


def test_websocket_sends_backlog_then_live_lines(system, logged):
    headers = {"Authorization": f"Bearer {system.api_key}"}
    with connect(ws_url(system, f"/ws/instances/{logged['id']}/logs"), additional_headers=headers,
                 open_timeout=10) as ws:
        backlog = [ws.recv(timeout=5)]
        try:
            while True:
                backlog.append(ws.recv(timeout=0.5))
        except TimeoutError:
            pass
        assert any("listening on" in line for line in backlog), backlog[-5:]  # the server's start-up, shipped
        client = openai.OpenAI(base_url=f"{system.base_url}/v1", api_key=system.api_key, max_retries=0)
        client.chat.completions.create(model="logged", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        seen = []
        try:  # llama-server reports each finished request with its timings
            while not any("print_timing" in line for line in seen):
                seen.append(ws.recv(timeout=3))
        except TimeoutError:
            pass
    assert any("print_timing" in line for line in seen), seen[-10:]


def test_websocket_without_credentials_is_refused(system, logged):
    # Refused at the handshake (HTTP 403): not a socket that opens and then sends nothing.
    with pytest.raises(InvalidStatus) as refused:
        with connect(ws_url(system, f"/ws/instances/{logged['id']}/logs"), open_timeout=5) as ws:
            ws.recv(timeout=3)
    assert refused.value.response.status_code == 403


def test_unknown_instance_logs_are_404(system):
    with system.client() as c:
        assert c.get("/api/v1/instances/999999/logs").status_code == 404
    assert httpx.get(f"{system.base_url}/api/v1/instances/1/logs").status_code == 401
