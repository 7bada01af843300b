"""Two scheduler processes placing at once never over-commit a worker (separate processes, separate
database connections, as in production: the scheduler's row locks are what keeps them apart)."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from django.db import connection

from models_app import actions
from models_app.models import ModelInstance
from scheduler_app.estimate import estimate_model
from tests.factories import cpu_status, make_worker
from tests.fixtures.tiny_gguf import write_tiny_llama

pytestmark = pytest.mark.django_db(transaction=True)

REPO = Path(__file__).resolve().parents[2]
GIB = 1024**3
FITS = 3  # N: odd, so the last free slot is fought over by the two schedulers' same-numbered calls
EXTRA = 4  # M = N + 4 instances in all

# One scheduler process: the test database, then `schedule_instance` for its ids once the start file appears.
PLACER = r"""
import json, os, sys, time

import django
from django.conf import settings

settings.DATABASES["default"]["NAME"] = os.environ["PLACEMENT_DB_NAME"]
settings.CELERY_BROKER_URL = "memory://"  # launches are queued nowhere: no worker runs in this test
django.setup()

from django.db import connection
from models_app.models import ModelInstance
from scheduler_app.estimate import estimate_model
from scheduler_app.scheduler import schedule_instance

ids = json.loads(os.environ["PLACEMENT_IDS"])
estimate_model(ModelInstance.objects.get(pk=ids[0]).model)  # warm up (imports, file cache): start in step
open(os.environ["PLACEMENT_READY"], "w").close()
deadline = time.monotonic() + 60
while not os.path.exists(os.environ["PLACEMENT_GO"]):
    if time.monotonic() > deadline:
        sys.exit("the start file never appeared")
    time.sleep(0.001)
outcome = {i: schedule_instance(i) for i in ids}
connection.close()
print(json.dumps(outcome))
"""


class _NoQueue:
    """Stands in for the Celery task `do_create_model` queues: the test's own processes do the placing."""

    @staticmethod
    def delay(*args, **kwargs):
        return None


def _start_placer(ids: list[int], tmp: Path, tag: str) -> tuple[subprocess.Popen, Path]:
    ready = tmp / f"ready-{tag}"
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "aimind.settings",
           "PLACEMENT_DB_NAME": str(connection.settings_dict["NAME"]), "PLACEMENT_IDS": json.dumps(ids),
           "PLACEMENT_READY": str(ready), "PLACEMENT_GO": str(tmp / "go")}
    popen = subprocess.Popen([sys.executable, "-c", PLACER], env=env, cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    return popen, ready


def test_two_schedulers_never_over_commit_a_worker(tmp_path, monkeypatch):
    monkeypatch.setattr("scheduler_app.tasks.schedule_instance", _NoQueue)
    path = write_tiny_llama(tmp_path / "m.gguf")
    replicas = FITS + EXTRA
    model = actions.do_create_model(name="race", source="local_path", local_path=str(path), replicas=replicas)
    claim = estimate_model(model).claim(offload_layers=0, gpu_count=0).ram
    assert claim > 0
    worker = make_worker("w1", status=cpu_status((FITS * claim + claim // 2) / GIB))
    ram = worker.ram_total
    assert FITS * claim <= ram < (FITS + 1) * claim
    ids = sorted(ModelInstance.objects.filter(model=model).values_list("pk", flat=True))
    assert len(ids) == replicas
    assert set(ModelInstance.objects.values_list("state", flat=True)) == {"pending"}

    placers = [_start_placer(ids[0::2], tmp_path, "a"), _start_placer(ids[1::2], tmp_path, "b")]
    try:
        deadline = time.monotonic() + 120
        while not all(ready.exists() for _, ready in placers):
            for popen, _ in placers:
                if popen.poll() is not None:
                    pytest.fail(f"a scheduler process exited early:\n{popen.communicate()[1]}")
            assert time.monotonic() < deadline, "the scheduler processes never got ready"
            time.sleep(0.01)
        (tmp_path / "go").touch()  # both are connected and waiting: start them at the same moment
        outcomes = {}
        for popen, _ in placers:
            out, err = popen.communicate(timeout=180)
            assert popen.returncode == 0, err
            outcomes.update(json.loads(out.strip().splitlines()[-1]))
    finally:
        for popen, _ in placers:
            if popen.poll() is None:
                popen.kill()
                popen.wait()

    instances = list(ModelInstance.objects.filter(model=model).order_by("id"))
    scheduled = [i for i in instances if i.state == "scheduled"]
    pending = [i for i in instances if i.state == "pending"]
    summary = [(i.pk, i.state, i.worker_id, (i.computed_resource_claim or {}).get("ram"), i.state_message)
               for i in instances]
    assert len(scheduled) == FITS, summary
    assert len(pending) == replicas - FITS, summary
    assert all(i.worker_id == worker.pk for i in scheduled), summary
    for instance in pending:
        assert instance.worker_id is None
        assert "w1" in instance.state_message and "RAM" in instance.state_message, instance.state_message
    booked = sum(int(i.computed_resource_claim["ram"]) for i in ModelInstance.objects.filter(worker=worker))
    assert booked <= ram, summary
    assert sorted(outcomes.values()) == sorted(i.state for i in instances)
