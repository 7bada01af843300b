"""A worker whose heartbeats stop is not declared lost while its backends answer the server's own health probe:
their instances keep running (and serving); only those whose backends stop answering are moved."""

import threading
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from django.utils import timezone

from models_app.models import Model, ModelInstance
from tests.factories import make_worker
from workers_app.actions import do_heartbeat
from workers_app.tasks import mark_stale_workers

pytestmark = pytest.mark.django_db


class Health(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's name
        self.send_response(200 if self.path == "/health" else 404)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def backend():
    """A real HTTP server on loopback answering /health like llama-server."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def silent_worker_with(*ports):
    worker = make_worker("silent", last_heartbeat_at=timezone.now() - timedelta(seconds=120))
    model = Model.objects.create(name="m", source="local_path", local_path="/m.gguf", replicas=len(ports))
    instances = [ModelInstance.objects.create(model=model, name=f"m-{n}", worker=worker, state="running", port=port,
                                              backend="llama-box") for n, port in enumerate(ports)]
    return worker, instances


def states(instances):
    return [ModelInstance.objects.get(pk=i.pk).state for i in instances]


def test_a_silent_worker_whose_backend_answers_keeps_its_instance_running(backend):
    worker, instances = silent_worker_with(backend.server_port)
    for _ in range(3):  # run after run: nothing moves while the backend answers
        assert mark_stale_workers() == 1
        assert states(instances) == ["running"]
    worker.refresh_from_db()
    assert worker.state == "not_ready"  # no new placements there
    assert "1 of its backends still answer the server's health probe" in worker.state_message
    assert not instances[0].events.exists()


def test_once_the_backend_stops_answering_too_the_instance_is_moved(backend):
    _, instances = silent_worker_with(backend.server_port)
    mark_stale_workers()
    assert states(instances) == ["running"]
    backend.shutdown()
    backend.server_close()
    mark_stale_workers()
    assert states(instances) == ["unreachable"]
    mark_stale_workers()
    assert states(instances) == ["pending"]
    assert list(instances[0].events.values_list("cause", flat=True)) == ["worker_lost", "moved"]


def test_only_the_backends_that_do_not_answer_are_moved(backend):
    _, instances = silent_worker_with(backend.server_port, 1)  # nothing listens on port 1
    mark_stale_workers()
    mark_stale_workers()
    assert states(instances) == ["running", "pending"]


def test_a_heartbeat_brings_the_worker_back_with_its_instances_untouched(backend):
    worker, instances = silent_worker_with(backend.server_port)
    mark_stale_workers()

    do_heartbeat(worker, None)
    worker.refresh_from_db()
    assert (worker.state, worker.state_message) == ("ready", "")
    assert mark_stale_workers() == 0
    assert states(instances) == ["running"]


def test_an_unreachable_instance_whose_backend_answers_again_is_not_moved_but_runs_again(backend):
    _, instances = silent_worker_with(backend.server_port)
    ModelInstance.objects.filter(pk=instances[0].pk).update(state="unreachable")  # one missed probe, a blip
    mark_stale_workers()
    assert states(instances) == ["running"]
    assert list(instances[0].events.values_list("cause", flat=True)) == ["answers_probe"]
