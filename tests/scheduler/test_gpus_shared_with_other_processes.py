"""A GPU shared with processes the product did not start: the worker reports the memory they hold on each GPU
(NVML's per-process accounting, a fake driver here), the scheduler takes it off what is free, says so when a
placement fails for want of VRAM, and places the model once that memory is given back. The Resources page shows it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from types import SimpleNamespace

import httpx
import pytest
from django.core.wsgi import get_wsgi_application

from models_app import actions
from models_app.models import ModelInstance
from scheduler_app.scheduler import pending_instance_ids, schedule_instances
from tests.factories import GIB
from workers_app import measure
from workers_app.agent import NodeAgent
from workers_app.models import Worker
from workers_app.server_link import ServerLink


class FakeDriver:
    """The pynvml calls a worker makes, for GPUs of `totals` bytes; `used` is {GPU index: {pid: bytes}}."""

    class NVMLError(Exception):
        pass

    def __init__(self, totals: list[int]):
        self.totals = totals
        self.used: dict[int, dict[int, int]] = {i: {} for i in range(len(totals))}

    def nvmlInit(self):
        pass

    def nvmlShutdown(self):
        pass

    def nvmlDeviceGetCount(self):
        return len(self.totals)

    def nvmlDeviceGetHandleByIndex(self, index):
        return index

    def nvmlDeviceGetMemoryInfo(self, index):
        return SimpleNamespace(total=self.totals[index], used=sum(self.used[index].values()))

    def nvmlDeviceGetUtilizationRates(self, index):
        return SimpleNamespace(gpu=0)

    def nvmlDeviceGetName(self, index):
        return "NVIDIA fake"

    def nvmlDeviceGetUUID(self, index):
        return f"GPU-fake-{index}"

    def nvmlDeviceGetCudaComputeCapability(self, index):
        return 9, 0

    def nvmlDeviceGetComputeRunningProcesses(self, index):
        return [SimpleNamespace(pid=pid, usedGpuMemory=size) for pid, size in self.used[index].items()]

    def nvmlDeviceGetGraphicsRunningProcesses(self, index):
        raise self.NVMLError("not supported")


@pytest.fixture
def stranger():
    """A process the product did not start (another user's notebook, say): not a descendant of this process (the
    worker), so started by a parent that exits at once."""
    code = ("import subprocess, sys; print(subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], "
            "stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True).pid)")
    pid = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    yield SimpleNamespace(pid=pid)
    os.kill(pid, signal.SIGKILL)


def test_memory_held_outside_the_product_is_counted_per_gpu_and_the_products_own_is_not(stranger):
    driver = FakeDriver([24 * GIB, 24 * GIB])
    backend = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        driver.used = {0: {backend.pid: 6 * GIB, stranger.pid: 3 * GIB, os.getpid(): GIB}, 1: {stranger.pid: GIB}}
        measured, others = measure.sample({7: backend.pid}, [os.getpid()], nvml=driver)
    finally:
        backend.kill()
        backend.wait()
    assert others == {0: 3 * GIB, 1: GIB}  # the backend's 6 GiB and the worker's own 1 GiB are the product's
    assert measured["7"]["vram"] == {"0": 6 * GIB}


def test_a_process_the_worker_cannot_see_is_not_counted(stranger):
    """NVML names the host's process ids; a worker in a container sees its own. A pid that is not a process here
    cannot be told from the worker's own backends, so it is not taken off the free memory."""
    invisible = 2**22 + 7  # above Linux's largest pid
    driver = FakeDriver([24 * GIB])
    driver.used = {0: {invisible: 5 * GIB, stranger.pid: 3 * GIB}}
    _, others = measure.sample({}, [os.getpid()], nvml=driver)
    assert others == {0: 3 * GIB}


@pytest.fixture
def driver(monkeypatch):
    """The fake driver stands in for pynvml wherever the worker imports it; one GPU of 8 GiB. The worker can run
    llama-box here whatever this machine's compiler (its capability is not what this test is about)."""
    fake = FakeDriver([8 * GIB])
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setattr("workers_app.inventory.backend_capabilities", lambda node: {})
    return fake


@pytest.fixture
def agent(tmp_path, driver):
    """A real agent talking to the real API in this process (WSGI), as worker `shared`."""
    link = ServerLink("http://testserver", "test-cluster-token", tmp_path / "worker-credential",
                      transport=httpx.WSGITransport(app=get_wsgi_application()))
    running = NodeAgent(name="shared", server_url=link.server_url, token="", ip="127.0.0.1", data_dir=tmp_path,
                        link=link)
    running.join(attempts=1)
    yield running
    running.shutdown()


@pytest.mark.django_db(transaction=True)
def test_a_model_that_fits_only_without_the_other_processes_waits_for_their_memory(agent, driver, stranger,
                                                                                   llama_8b, client):
    driver.used[0] = {stranger.pid: int(3.5 * GIB)}
    agent.heartbeat()
    [gpu] = Worker.objects.get(name="shared").status["gpus"]
    assert gpu["memory"]["used_by_others"] == int(3.5 * GIB) and gpu["memory"]["total"] == 8 * GIB

    model = actions.do_create_model(name="m", source="local_path", local_path=str(llama_8b), cpu_offloading=False)
    schedule_instances(pending_instance_ids())
    [instance] = ModelInstance.objects.filter(model=model)
    assert instance.state == "pending" and instance.worker is None
    assert "largest free is 4.5 GiB (3.5 GiB used by other processes)" in instance.state_message, \
        instance.state_message
    page = client.get("/resources/").content.decode()
    assert "used by other processes 3.5" in page and 'class="others"' in page

    driver.used[0] = {}  # the other process let go of its memory
    agent.heartbeat()
    assert "used_by_others" in Worker.objects.get(name="shared").status["gpus"][0]["memory"]
    schedule_instances(pending_instance_ids())
    instance.refresh_from_db()
    assert instance.worker.name == "shared" and instance.gpu_indexes == [0], instance.state_message
    assert 4.5 * GIB < instance.computed_resource_claim["vram"]["0"] <= 8 * GIB


@pytest.fixture
def client(django_user_model):
    from django.test import Client

    admin = django_user_model.objects.create_superuser("admin", password="pw")
    logged_in = Client()
    logged_in.force_login(admin)
    return logged_in
