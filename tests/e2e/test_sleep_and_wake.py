"""On a real system with the tiny model: a model deployed with "sleep after N minutes idle" is put to sleep by the
beat once idle (its instance deleted, its llama-server ended), and a chat request wakes it and is answered. Prints
the time from that request to its answer."""

import time

import httpx
import psutil

from tests.e2e.system import wait_until

# Its last use 10 minutes ago: the model, its instance and the last request are moved into the past.
MAKE_IDLE = """
from datetime import timedelta
from django.utils import timezone
from models_app.models import Model, ModelInstance
then = timezone.now() - timedelta(minutes=10)
Model.objects.filter(name="{name}").update(created_at=then, last_request_at=then)
ModelInstance.objects.filter(model__name="{name}").update(running_since=then)
"""


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_an_idle_model_sleeps_and_a_request_wakes_it(system, deploy):
    model = deploy("sleeper", sleep_after_minutes=1)
    [running] = system.wait_for_instances(model["id"], "running")
    assert model["sleep_after_minutes"] == 1 and model["asleep"] is False

    system.manage("shell", "-c", MAKE_IDLE.format(name="sleeper"))

    with system.client() as c:
        def asleep():
            found = c.get(f"/api/v1/models/{model['id']}").json()
            return found["asleep"] and not c.get(f"/api/v1/models/{model['id']}/instances").json()

        def listed_without_replicas():
            listing = c.get("/v1/models").json()["data"]
            return next(m for m in listing if m["id"] == "sleeper")["ready_replicas"] == 0

        wait_until(asleep, 30, "the beat to put the idle model to sleep")
        wait_until(listed_without_replicas, 5, "the gateway's tables to follow")
    wait_until(lambda: not alive(running["pid"]), 15, "the sleeping model's llama-server to end")

    began = time.monotonic()
    answer = httpx.post(f"{system.base_url}/v1/chat/completions", timeout=180,
                        headers={"Authorization": f"Bearer {system.api_key}"},
                        json={"model": "sleeper", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8})
    took = time.monotonic() - began
    print(f"\nrequest to a sleeping tiny model answered in {took:.2f} s (wake, schedule, start llama-server, answer)")

    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["message"]["role"] == "assistant"
    with system.client() as c:
        woken = c.get(f"/api/v1/models/{model['id']}").json()
        [instance] = c.get(f"/api/v1/models/{model['id']}/instances").json()
    assert woken["asleep"] is False and woken["last_request_at"] is not None
    assert instance["state"] == "running" and instance["id"] != running["id"] and alive(instance["pid"])
