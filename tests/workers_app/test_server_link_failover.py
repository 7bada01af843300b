"""A worker given several server URLs (servers side by side on one database) keeps talking to the cluster when one
server is down or failing: the next one answers, and is kept."""

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from workers_app.server_link import ServerLink, ServerUnreachable


def serving(status: int):
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's name
            self.rfile.read(int(self.headers.get("content-length") or 0))
            seen.append(self.path)
            body = json.dumps({"ok": True}).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, seen, f"http://127.0.0.1:{server.server_port}"


@pytest.fixture
def servers():
    started = {name: serving(status) for name, status in (("good", 200), ("failing", 503))}
    yield started
    for server, _, _ in started.values():
        server.shutdown()
        server.server_close()


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def link_to(*urls, tmp_path):
    link = ServerLink(",".join(urls), "token", tmp_path / "credential", timeout=2)
    link.worker_id = 7
    return link


def test_a_server_that_is_down_passes_the_call_to_the_next_which_is_kept(servers, tmp_path):
    _, seen, good = servers["good"]
    link = link_to(closed_port_url(), good, tmp_path=tmp_path)
    assert link.heartbeat({}) is True
    assert link.server_url == good
    assert link.heartbeat({}) is True
    assert seen == ["/api/v1/workers/7/heartbeat"] * 2


def test_a_server_answering_5xx_passes_the_call_on(servers, tmp_path):
    _, failing_seen, failing = servers["failing"]
    _, good_seen, good = servers["good"]
    link = link_to(failing, good, tmp_path=tmp_path)
    assert link.heartbeat({}) is True
    assert (len(failing_seen), len(good_seen), link.server_url) == (1, 1, good)


def test_when_no_server_answers_the_worker_hears_why_from_each(servers, tmp_path):
    _, _, failing = servers["failing"]
    down = closed_port_url()
    link = link_to(down, failing, tmp_path=tmp_path)
    with pytest.raises(ServerUnreachable) as refused:
        link.heartbeat({})
    assert down in str(refused.value) and f"{failing}/api/v1/workers/7/heartbeat answered 503" in str(refused.value)
