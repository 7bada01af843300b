"""The gateway balances round-robin over a model's running replicas, and says why when it cannot route."""

import pytest
from asgiref.sync import async_to_sync

from gateway_app.routing import NoRunningInstance, UnknownModel, pick_upstream
from models_app.models import Model, ModelInstance
from tests.factories import make_worker

pytestmark = pytest.mark.django_db(transaction=True)


def test_requests_rotate_over_running_replicas():
    worker = make_worker("w1")
    model = Model.objects.create(name="m", source="local_path", local_path="/m.gguf", replicas=3)
    for n, state in enumerate(["running", "running", "starting"]):
        ModelInstance.objects.create(model=model, name=f"m-{n}", worker=worker, port=41000 + n, state=state)
    picked = [async_to_sync(pick_upstream)("m").base_url for _ in range(4)]
    assert picked[0] != picked[1]
    assert picked[0] == picked[2] and picked[1] == picked[3]
    assert set(picked) == {"http://127.0.0.1:41000", "http://127.0.0.1:41001"}


def test_unknown_model_and_no_running_instance_are_told_apart():
    Model.objects.create(name="idle", source="local_path", local_path="/m.gguf", replicas=0)
    with pytest.raises(UnknownModel):
        async_to_sync(pick_upstream)("nope")
    with pytest.raises(NoRunningInstance):
        async_to_sync(pick_upstream)("idle")
