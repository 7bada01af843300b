"""A request for a sleeping model wakes it (its instance is created), waits for a replica to run, and is answered by
it; when none runs within AIMIND_GATEWAY_WAKE_TIMEOUT the answer is 503 `model_waking` with Retry-After. The
requests of one process waiting for the same model wake it once."""

import asyncio
import json

import pytest
from asgiref.sync import async_to_sync, sync_to_async

from gateway_app import waking
from gateway_app.models import ApiKey
from models_app.models import Model, ModelInstance
from tests.factories import make_worker
from tests.gateway_app.fake_backend import APP, CHAT, FakeBackend, call

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def no_wakes_remembered():
    waking._woken_at.clear()
    yield
    waking._woken_at.clear()


def sleeping(name: str = "tiny", replicas: int = 1) -> Model:
    return Model.objects.create(name=name, source="local_path", local_path="/m.gguf", replicas=replicas,
                                backend="llama-box", sleep_after_minutes=5, asleep=True)


def start_running(instance_id: int, port: int) -> None:
    """What the worker and the scheduler do for a woken instance, at the end: it runs, at this port."""
    instance = ModelInstance.objects.get(pk=instance_id)
    instance.worker, instance.port, instance.state = make_worker("w1"), port, "running"
    instance.backend, instance.backend_api_key = "llama-box", "secret"
    instance.save()


async def created_instances(model: Model, timeout: float = 10) -> list[int]:
    def ids() -> list[int]:
        return list(ModelInstance.objects.filter(model=model).values_list("pk", flat=True))

    for _ in range(int(timeout / 0.02)):
        found = await sync_to_async(ids)()
        if found:
            return found
        await asyncio.sleep(0.02)
    raise AssertionError("the request did not wake the model")


def test_a_request_wakes_a_sleeping_model_and_is_answered_once_a_replica_runs(admin_user, settings):
    settings.GATEWAY_WAKE_TIMEOUT = 30
    key = ApiKey.issue(admin_user, "k")[1]
    model = sleeping()

    @async_to_sync
    async def run():
        backend = FakeBackend("woken")
        port = await backend.start()
        try:
            requests = [asyncio.ensure_future(call(APP, "POST", "/v1/chat/completions", key=key, json_body=CHAT))
                        for _ in range(3)]
            ids = await created_instances(model)
            await asyncio.sleep(0.3)  # the waiting requests look again meanwhile: still nothing runs
            assert not any(r.done() for r in requests)
            await sync_to_async(start_running)(ids[0], port)
            return await asyncio.gather(*requests), len(backend.received)
        finally:
            await backend.stop()

    answers, served = run()
    assert [a["status"] for a in answers] == [200] * 3 and served == 3
    assert {json.loads(a["body"])["served_by"] for a in answers} == {"woken"}
    model.refresh_from_db()
    assert not model.asleep and model.last_request_at is not None
    assert ModelInstance.objects.filter(model=model).count() == 1  # woken once


def test_a_model_that_does_not_start_in_time_gets_503_with_retry_after(admin_user, settings):
    settings.GATEWAY_WAKE_TIMEOUT = 0.5
    key = ApiKey.issue(admin_user, "k")[1]
    model = sleeping(replicas=2)

    answer = async_to_sync(call)(APP, "POST", "/v1/chat/completions", key=key, json_body=CHAT)

    assert answer["status"] == 503
    assert answer["headers"]["retry-after"] == str(waking.RETRY_AFTER_SECONDS)
    error = json.loads(answer["body"])["error"]
    assert error["code"] == "model_waking" and error["type"] == "service_unavailable"
    assert "'tiny'" in error["message"] and "starting" in error["message"]
    model.refresh_from_db()
    assert not model.asleep  # it was woken: its instances go on starting for the next request
    assert ModelInstance.objects.filter(model=model, state="pending").count() == 2


def test_a_model_without_the_option_and_no_replica_is_refused_at_once(admin_user, settings):
    settings.GATEWAY_WAKE_TIMEOUT = 30
    key = ApiKey.issue(admin_user, "k")[1]
    Model.objects.create(name="tiny", source="local_path", local_path="/m.gguf", replicas=1, backend="llama-box")

    answer = async_to_sync(call)(APP, "POST", "/v1/chat/completions", key=key, json_body=CHAT)

    assert answer["status"] == 503
    assert json.loads(answer["body"])["error"]["code"] == "no_running_instance"
    assert "retry-after" not in answer["headers"]


def test_a_model_that_sleeps_but_whose_instances_failed_answers_503_at_once(admin_user, settings):
    settings.GATEWAY_WAKE_TIMEOUT = 30  # no request waits that long for a replica that is not on its way
    key = ApiKey.issue(admin_user, "k")[1]
    model = Model.objects.create(name="tiny", source="local_path", local_path="/m.gguf", replicas=1,
                                 backend="llama-box", sleep_after_minutes=5)
    ModelInstance.objects.create(model=model, name="tiny-0", state="error", state_message="exit 1")
    answer = async_to_sync(call)(APP, "POST", "/v1/chat/completions", key=key, json_body=CHAT)
    assert answer["status"] == 503
    assert json.loads(answer["body"])["error"]["code"] == "no_running_instance"
