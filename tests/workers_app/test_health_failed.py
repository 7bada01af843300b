"""A backend whose process runs on but stops answering its health check fails as its own step of the timeline,
`health_failed` ("Health check failed"), apart from a crash (`failed`, with the exit code); so does a start that never
answers. Each failure's event keeps the restart it booked, and the timeline still shows it after the restart.

A real agent talks to the real API (in this process, through WSGI) and runs a real tiny HTTP server as its backend:
its /health answers 200 until the test makes it fail (503), or exits when the test makes it crash."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import httpx
import pytest
from django.core.wsgi import get_wsgi_application
from django.test import Client

from models_app import actions
from models_app.models import InstanceEvent, ModelInstance
from workers_app.agent import HEALTH_FAILURES_BEFORE_ERROR, NodeAgent
from workers_app.backends.base import Backend, Installation, LaunchSpec, registered
from workers_app.models import Worker
from workers_app.server_link import ServerLink

pytestmark = pytest.mark.django_db(transaction=True)  # the agent's threads use connections of their own

SERVER = """
import http.server, os, sys
host, port, sick, crash = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]

class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if os.path.exists(crash):
            os._exit(3)
        self.send_response(503 if os.path.exists(sick) else 200)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass

http.server.ThreadingHTTPServer((host, port), Health).serve_forever()
"""


class TinyBackend(Backend):
    """A backend that is a tiny HTTP server: healthy until `sick` exists, gone (exit code 3) once `crash` does."""

    name = "tiny"
    label = "Tiny"
    default_version = "1.0"
    formats = frozenset({"gguf"})
    selectors = "scheduler_app.selectors.vox_box.SELECTORS"

    def __init__(self, root: Path):
        self.root = root
        self.sick, self.crash = root / "sick", root / "crash"
        (root / "server.py").write_text(SERVER)

    def find(self, version: str, variant: str) -> Installation | None:
        return Installation(self.name, version, variant, self.root, Path(sys.executable))

    def command(self, spec: LaunchSpec) -> list[str]:
        return [str(spec.installation.entry), str(self.root / "server.py"), spec.host, str(spec.port),
                str(self.sick), str(self.crash)]


@pytest.fixture
def agent(tmp_path):
    link = ServerLink("http://testserver", "test-cluster-token", tmp_path / "worker-credential",
                      transport=httpx.WSGITransport(app=get_wsgi_application()))
    running = NodeAgent(name="w", server_url=link.server_url, token="", ip="127.0.0.1", data_dir=tmp_path, link=link)
    running.join(attempts=1)
    yield running
    running.shutdown()


@pytest.fixture
def tiny(tmp_path):
    backend = TinyBackend(tmp_path)
    registered()[backend.name] = backend
    yield backend
    del registered()[backend.name]


@pytest.fixture
def page(admin_user):
    client = Client()
    client.force_login(admin_user)
    return client


def scheduled_instance(tmp_path) -> ModelInstance:
    model_file = tmp_path / "m.gguf"
    model_file.write_bytes(b"GGUF")
    model = actions.do_create_model(name="m", source="local_path", local_path=str(model_file), replicas=0,
                                    backend="llama-box", restart_on_error=True)
    return ModelInstance.objects.create(model=model, name="m-1", state="scheduled", worker=Worker.objects.get(name="w"),
                                        backend="tiny", backend_version="1.0")


def supervise_until(agent: NodeAgent, instance: ModelInstance, predicate, what: str, timeout: float = 30):
    """Run the agent's supervision (as its loop does) until the instance's row satisfies `predicate`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        agent.supervise_once()
        row = ModelInstance.objects.filter(pk=instance.pk).first()
        if row is not None and predicate(row):
            return row
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def health_failures(instance) -> int:
    return InstanceEvent.objects.filter(instance_id=instance.pk, cause="health_failed").count()


def causes(instance) -> list[tuple[str, str]]:
    return [(e.cause, e.to_state) for e in InstanceEvent.objects.filter(instance_id=instance.pk).order_by("id")]


def test_a_backend_that_stops_answering_fails_its_health_check_and_its_restart_stays_on_the_timeline(
        agent, tiny, tmp_path, page, settings):
    settings.RESTART_BACKOFF_BASE = 30.0
    instance = scheduled_instance(tmp_path)
    agent.launch(instance.pk)
    first = supervise_until(agent, instance, lambda r: r.state == "running", "the backend to run")

    tiny.sick.touch()  # the process runs on; /health answers 503 from now on
    supervise_until(agent, instance, lambda r: health_failures(r) == 1, "the health check to fail")
    tiny.sick.unlink()  # the restart (booked at once, perhaps under way already) answers again
    [event] = InstanceEvent.objects.filter(instance_id=instance.pk, cause="health_failed")
    assert (event.from_state, event.to_state) == ("running", "error")
    assert event.message == (f"backend stopped answering /health ({HEALTH_FAILURES_BEFORE_ERROR} checks in a row); "
                             f"it was stopped")
    assert event.restart_at is not None and event.restart_at <= event.time  # the first restart: at once
    assert first.pid not in {p.pid for p in agent.processes.values()}  # stopped: it served nobody

    again = supervise_until(agent, instance, lambda r: r.state == "running" and r.restart_count == 1,
                            "the restart to run")
    assert again.pid != first.pid and again.next_restart_at is None
    assert causes(instance) == [("start", "starting"), ("healthy", "running"), ("health_failed", "error"),
                                ("restart", "scheduled"), ("start", "starting"), ("healthy", "running")]

    tiny.sick.touch()  # fails again: this restart is booked RESTART_BACKOFF_BASE later
    second = supervise_until(agent, instance, lambda r: health_failures(r) == 2, "the second health failure")
    assert second.state == "error"
    booked = InstanceEvent.objects.filter(instance_id=instance.pk, cause="health_failed").order_by("-id").first()
    assert booked.restart_at == second.next_restart_at
    assert 29 <= (booked.restart_at - booked.time).total_seconds() <= 31

    history = page.get(f"/api/v1/instances/{instance.pk}/events").json()
    assert [e["restart_at"] is not None for e in history if e["cause"] == "health_failed"] == [True, True]
    html = page.get(f"/instances/{instance.pk}/").content.decode()
    timeline = html[html.index('<ol class="timeline">'):]
    assert timeline.count('data-cause="health_failed"') == 2 and "Health check failed" in timeline
    assert f"Restart booked for {event.restart_at:%Y-%m-%d %H:%M:%S} UTC: at once." in timeline  # after it happened
    assert f"Restart booked for {booked.restart_at:%Y-%m-%d %H:%M:%S} UTC, 30 s after the failure." in timeline
    order = [timeline.index(f'data-cause="{cause}"') for cause in ("healthy", "health_failed", "restart")]
    assert order == sorted(order)


def test_a_crash_is_a_failure_with_its_exit_code_not_a_health_failure(agent, tiny, tmp_path):
    instance = scheduled_instance(tmp_path)
    agent.launch(instance.pk)
    supervise_until(agent, instance, lambda r: r.state == "running", "the backend to run")
    tiny.crash.touch()  # the next health check makes the process exit with code 3
    failed = supervise_until(agent, instance, lambda r: r.state == "error", "the crash to be seen")
    assert failed.state_message.startswith("backend exited with code 3")
    assert causes(instance)[-1] == ("failed", "error")
    assert not InstanceEvent.objects.filter(instance_id=instance.pk, cause="health_failed").exists()


def test_a_start_that_never_answers_is_a_health_failure_too(agent, tiny, tmp_path, settings):
    settings.BACKEND_START_TIMEOUT = 1.0
    tiny.sick.touch()  # it never answers 200
    instance = scheduled_instance(tmp_path)
    agent.launch(instance.pk)
    failed = supervise_until(agent, instance, lambda r: r.state == "error", "the start to time out")
    assert failed.state_message == "backend did not answer /health within 1 s"
    assert causes(instance)[-1] == ("health_failed", "error")
    assert instance.pk not in agent.processes


def test_the_worker_door_takes_only_failure_causes_for_a_failure(agent, tiny, tmp_path):
    instance = scheduled_instance(tmp_path)
    ModelInstance.objects.filter(pk=instance.pk).update(state="running")
    assert agent.link.report("failed", instance.pk, message="x", cause="worker_returned") == (False, None)
    assert ModelInstance.objects.get(pk=instance.pk).state == "running"  # refused (400): nothing applied
