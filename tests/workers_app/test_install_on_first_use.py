"""A worker installs a backend the first time an instance needs it, in that instance's own thread: the instance
shows `initializing` with the installer's progress, and the agent's lock stays free, so health checks, log
shipping and stop requests for its other backends go on. An install that fails names its cause on the instance."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from django.core.wsgi import get_wsgi_application

from models_app import actions
from models_app.models import ModelInstance
from workers_app.agent import NodeAgent
from workers_app.backends.base import Backend, BackendError, Installation, LaunchSpec, registered
from workers_app.models import Worker
from workers_app.server_link import ServerLink

pytestmark = pytest.mark.django_db(transaction=True)  # the agent's threads use connections of their own


class SlowBackend(Backend):
    """Installs only when the test opens the gate; then runs a plain sleeping process."""

    name = "slow"
    label = "Slow"
    default_version = "1.0"
    formats = frozenset({"gguf"})
    selectors = "scheduler_app.selectors.vox_box.SELECTORS"

    def __init__(self, root: Path, fail: str = ""):
        self.root, self.fail = root, fail
        self.gate, self.started = threading.Event(), threading.Event()
        self.installed = False
        self.installs = 0

    def find(self, version: str, variant: str) -> Installation | None:
        if not self.installed:
            return None
        return Installation(self.name, version, variant, self.root, Path(sys.executable))

    def install(self, version: str, variant: str, progress=print) -> Installation:
        self.installs += 1
        self.started.set()
        progress("installing slow 1.0, step 2/3: Downloading slow-1.0.whl (5 MB)")
        assert self.gate.wait(30)
        if self.fail:
            raise BackendError(self.fail, permanent=True)
        self.installed = True
        return self.find(version, variant)

    def command(self, spec: LaunchSpec) -> list[str]:
        return [str(spec.installation.entry), "-c", "import time; time.sleep(60)"]


@pytest.fixture
def agent(tmp_path):
    """A real agent talking to the real API, in this process (WSGI), as worker `w`."""
    link = ServerLink("http://testserver", "test-cluster-token", tmp_path / "worker-credential",
                      transport=httpx.WSGITransport(app=get_wsgi_application()))
    running = NodeAgent(name="w", server_url=link.server_url, token="", ip="127.0.0.1", data_dir=tmp_path, link=link)
    running.join(attempts=1)
    yield running
    running.shutdown()


@pytest.fixture
def slow(tmp_path):
    backend = SlowBackend(tmp_path)
    registered()[backend.name] = backend
    yield backend
    backend.gate.set()
    del registered()[backend.name]


def scheduled_instance(tmp_path) -> ModelInstance:
    model_file = tmp_path / "m.gguf"
    model_file.write_bytes(b"GGUF")
    worker = Worker.objects.get(name="w")
    model = actions.do_create_model(name="m", source="local_path", local_path=str(model_file), replicas=0,
                                    backend="llama-box")
    return ModelInstance.objects.create(model=model, name="m-1", state="scheduled", worker=worker, backend="slow",
                                        backend_version="1.0")


def wait_for(predicate, timeout: float = 20):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError("timed out")


def test_install_runs_without_the_agents_lock_and_shows_progress(agent, slow, tmp_path):
    instance = scheduled_instance(tmp_path)
    agent.launch(instance.pk)
    agent.launch(instance.pk)  # a duplicate launch task, before the first has left `scheduled`
    assert slow.started.wait(10)
    row = wait_for(lambda: ModelInstance.objects.filter(pk=instance.pk, state="initializing",
                                                        state_message__contains="Downloading").first())
    assert row.state_message == "installing slow 1.0, step 2/3: Downloading slow-1.0.whl (5 MB)"
    assert agent.lock.acquire(timeout=1)  # free while the install runs
    agent.lock.release()
    agent.supervise_once()
    slow.gate.set()
    started = wait_for(lambda: ModelInstance.objects.filter(pk=instance.pk, state="starting", pid__isnull=False)
                       .first())
    assert started.backend_version == "1.0" and instance.pk in agent.processes
    assert slow.installs == 1


def test_a_failed_install_is_the_instances_error(agent, slow, tmp_path):
    slow.fail = "slow version 1.0: slow==1.0 is not on the package index (no such version?)"
    slow.gate.set()
    instance = scheduled_instance(tmp_path)
    agent.launch(instance.pk)
    failed = wait_for(lambda: ModelInstance.objects.filter(pk=instance.pk, state="error").first())
    assert failed.error_kind == "permanent" and failed.next_restart_at is None
    assert failed.state_message.startswith(slow.fail)
    wait_for(lambda: instance.pk not in agent.preparing)
