"""What each backend really uses: the worker measures its process tree's RSS and, through NVML, its processes' VRAM,
sends it with the heartbeat; the server keeps it beside the claim and flags (with an event, once) a backend that uses
more than 15 % over its claim, until it is back below 105 %."""

import os
import subprocess
import sys
import time
from types import SimpleNamespace

import psutil
import pytest
from django.test import Client

from models_app.models import InstanceEvent, Model, ModelInstance
from tests.factories import cpu_status
from workers_app import measure
from workers_app.models import Worker

GIB = 1024**3


class FakeNvml:
    """pynvml's per-process calls, for two GPUs: `used` is {GPU index: {pid: bytes}}."""

    class NVMLError(Exception):
        pass

    def __init__(self, used: dict[int, dict[int, int]]):
        self.used = used

    def nvmlInit(self):
        pass

    def nvmlShutdown(self):
        pass

    def nvmlDeviceGetCount(self):
        return len(self.used)

    def nvmlDeviceGetHandleByIndex(self, index):
        return index

    def nvmlDeviceGetComputeRunningProcesses(self, handle):
        return [SimpleNamespace(pid=pid, usedGpuMemory=size) for pid, size in self.used[handle].items()]

    def nvmlDeviceGetGraphicsRunningProcesses(self, handle):
        raise self.NVMLError("not supported")


@pytest.fixture
def child():
    """A backend-like tree: a process with a child of its own holding 64 MiB."""
    code = ("import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', "
            "'import time; b = bytearray(64 * 1024 * 1024); time.sleep(60)']); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        for _ in range(100):
            kids = psutil.Process(proc.pid).children()
            if kids and kids[0].memory_info().rss > 64 * 1024**2:
                break
            time.sleep(0.05)
        yield proc
    finally:
        for kid in psutil.Process(proc.pid).children(recursive=True):
            kid.kill()
        proc.kill()
        proc.wait()


def test_a_process_tree_is_measured_whole_and_gpu_memory_counts_only_its_processes(child):
    kid = psutil.Process(child.pid).children()[0].pid
    nvml = FakeNvml({0: {kid: 3 * GIB, os.getpid(): 5 * GIB}, 1: {}})
    found = measure.measure({7: child.pid, 8: 999_999_999}, nvml=nvml)
    assert set(found) == {"7"}  # a process that is gone is left out
    expected = sum(psutil.Process(p).memory_info().rss for p in (child.pid, kid))
    assert 64 * 1024**2 < found["7"]["ram"] and abs(found["7"]["ram"] - expected) < 16 * 1024**2
    assert found["7"]["vram"] == {"0": 3 * GIB}  # another process's 5 GiB on GPU 0 is not this backend's


def test_without_an_nvidia_driver_only_ram_is_measured():
    class NoDriver(FakeNvml):
        def nvmlInit(self):
            raise self.NVMLError("driver not loaded")

    found = measure.measure({1: os.getpid()}, nvml=NoDriver({}))
    assert found["1"]["vram"] == {} and found["1"]["ram"] > 0


@pytest.fixture
def running(db):
    answer = Client(HTTP_AUTHORIZATION="Bearer test-cluster-token").post(
        "/api/v1/workers", {"name": "w", "status": cpu_status()}, content_type="application/json").json()
    worker = Worker.objects.get(pk=answer["id"])
    client = Client(HTTP_AUTHORIZATION="Bearer test-cluster-token", HTTP_X_WORKER_CREDENTIAL=answer["credential"])
    model = Model.objects.create(name="m", source="local_path", local_path="/m.gguf")
    instance = ModelInstance.objects.create(model=model, name="m-1", worker=worker, state="running",
                                            computed_resource_claim={"ram": GIB, "vram": {"0": 2 * GIB}})
    other = ModelInstance.objects.create(model=model, name="m-2", worker=Worker.objects.create(name="x"),
                                         state="running", computed_resource_claim={"ram": GIB})

    def beat(measured: dict):
        response = client.post(f"/api/v1/workers/{worker.pk}/heartbeat", {"status": cpu_status(),
                               "measured": measured}, content_type="application/json")
        assert response.status_code == 200, response.content
        instance.refresh_from_db()
        return instance

    return SimpleNamespace(instance=instance, other=other, beat=beat, credential=answer["credential"])


def test_the_heartbeat_keeps_what_each_backend_uses_beside_its_claim(running):
    within = running.beat({str(running.instance.pk): {"ram": int(1.1 * GIB), "vram": {"0": 2 * GIB}},
                           str(running.other.pk): {"ram": 9 * GIB}})
    assert within.measured["ram"] == int(1.1 * GIB) and within.measured["vram"] == {"0": 2 * GIB}
    assert within.measured["over_claim"] == "" and within.measured["at"]
    running.other.refresh_from_db()
    assert running.other.measured == {}  # another worker's instance: not this worker's to report
    assert not InstanceEvent.objects.filter(cause="over_claim").exists()


def test_using_more_than_15_percent_over_the_claim_is_flagged_once(running, client):
    pk = str(running.instance.pk)
    over = running.beat({pk: {"ram": int(1.5 * GIB), "vram": {"0": 2 * GIB}}})
    assert over.measured["over_claim"] == "RAM: uses 1.50 GiB, claimed 1.00 GiB (+50 %)"
    running.beat({pk: {"ram": int(1.6 * GIB), "vram": {"0": 3 * GIB}}})
    [event] = InstanceEvent.objects.filter(cause="over_claim")
    assert (event.from_state, event.to_state) == ("running", "running")
    assert event.message == "uses more than it claimed: RAM: uses 1.50 GiB, claimed 1.00 GiB (+50 %)"
    assert "GPU 0: uses 3.00 GiB, claimed 2.00 GiB (+50 %)" in running.instance.measured["over_claim"]
    api = client.get(f"/api/v1/instances/{pk}").json()
    assert api["measured"]["over_claim"].startswith("RAM: uses 1.60 GiB")
    page = client.get(f"/instances/{pk}/").content.decode()
    assert "Uses more than it claimed:" in page and "<td>1.6\xa0GB</td>" in page
    back = running.beat({pk: {"ram": GIB, "vram": {"0": 2 * GIB}}})
    assert back.measured["over_claim"] == ""
    running.beat({pk: {"ram": 2 * GIB}})
    assert InstanceEvent.objects.filter(cause="over_claim").count() == 2  # crossed again, after clearing


def test_a_use_hovering_around_the_line_is_flagged_once_until_it_is_back_below_105_percent(running):
    pk = str(running.instance.pk)
    for used in (1.16, 1.12, 1.18, 1.10, 1.20, 1.06):  # over 115 %, then wobbling above 105 %: one event
        assert running.beat({pk: {"ram": int(used * GIB)}}).measured["over_claim"].startswith("RAM: uses ")
    assert running.instance.measured["over_claim"] == "RAM: uses 1.06 GiB, claimed 1.00 GiB (+6 %)"
    assert InstanceEvent.objects.filter(cause="over_claim").count() == 1
    assert running.beat({pk: {"ram": int(1.04 * GIB)}}).measured["over_claim"] == ""  # back below 105 %: cleared
    assert running.beat({pk: {"ram": int(1.12 * GIB)}}).measured["over_claim"] == ""  # not over 115 %: no news
    running.beat({pk: {"ram": int(1.16 * GIB)}})
    assert InstanceEvent.objects.filter(cause="over_claim").count() == 2  # crossed again, after clearing


def test_the_models_page_shows_the_flag_and_the_use_beside_the_claim(running, client):
    from models_app.live import snapshot

    pk, model = str(running.instance.pk), running.instance.model_id
    unmeasured = snapshot()[model]
    running.beat({pk: {"ram": int(1.5 * GIB)}})
    flagged = snapshot()[model]
    assert flagged != unmeasured  # the live page re-renders the row
    page = client.get("/").content.decode()
    row = page[page.index(f'data-instance-id="{pk}"'):]
    row = row[:row.index("</tr>")]
    assert ('<span class="tag warn over-claim" title="RAM: uses 1.50 GiB, claimed 1.00 GiB (+50 %)">Over claim</span>'
            in row)
    assert '<td class="memory">1.5\xa0GB / 3.0\xa0GB</td>' in row  # RAM and VRAM together: used / claimed
    other = page[page.index(f'data-instance-id="{running.other.pk}"'):]
    assert '<td class="memory">— / 1.0\xa0GB</td>' in other[:other.index("</tr>")]
    running.beat({pk: {"ram": int(1.5 * GIB) + 4096}})  # what the row shows is the same: no re-render
    assert snapshot()[model] == flagged
    assert "超出申领" in client.get("/", HTTP_ACCEPT_LANGUAGE="zh-CN").content.decode()


def test_a_few_megabytes_over_a_tiny_claim_is_no_news(running):
    ModelInstance.objects.filter(pk=running.instance.pk).update(computed_resource_claim={"ram": 10 * 1024**2})
    assert running.beat({str(running.instance.pk): {"ram": 13 * 1024**2}}).measured["over_claim"] == ""  # +3 MiB


@pytest.fixture
def client(admin_user):
    client = Client()
    client.force_login(admin_user)
    return client


@pytest.mark.parametrize("measured", [{"²": {"ram": 1}}, {"01": {"ram": 1}}, {"1": {"ram": -1}},
                                      {"1": {"ram": 1, "vram": {"zero": 5}}}, {"1": {}}])
def test_a_garbled_measurement_is_refused_field_by_field(running, measured):
    client = Client(HTTP_AUTHORIZATION="Bearer test-cluster-token")
    worker = running.instance.worker
    response = client.post(f"/api/v1/workers/{worker.pk}/heartbeat", {"measured": measured},
                           content_type="application/json",
                           HTTP_X_WORKER_CREDENTIAL=running.credential)
    assert response.status_code == 400 and "measured" in response.json()


def test_nothing_claimed_is_no_yardstick(running):
    ModelInstance.objects.filter(pk=running.instance.pk).update(computed_resource_claim={"ram": 0, "vram": {"0": GIB}})
    assert running.beat({str(running.instance.pk): {"ram": 3 * GIB, "vram": {"0": GIB}}}).measured["over_claim"] == ""
