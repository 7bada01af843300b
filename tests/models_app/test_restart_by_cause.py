"""A failure that retrying cannot fix stays in error with its cause, books no restart and frees its claim until the
model is edited or the instance deleted; a crash keeps the backoff."""

import pytest

from models_app import actions, lifecycle
from models_app.models import ModelInstance
from scheduler_app.scheduler import build_pool
from tests.factories import make_worker

pytestmark = pytest.mark.django_db
GIB = 1024**3


@pytest.fixture
def placed():
    worker = make_worker("w")
    model = actions.do_create_model(name="m", source="local_path", local_path="/m.gguf", replicas=1)
    [instance] = ModelInstance.objects.all()
    ModelInstance.objects.filter(pk=instance.pk).update(state="starting", worker=worker,
                                                        computed_resource_claim={"ram": 4 * GIB, "vram": {}})
    instance.refresh_from_db()
    return worker, model, instance


def free_ram(worker) -> int:
    worker.refresh_from_db()
    return build_pool([worker])[worker.id].ram_free


def test_permanent_failure_books_no_restart_and_releases_its_claim(placed):
    worker, _, instance = placed
    before = free_ram(worker)
    assert lifecycle.do_fail_instance(instance, "backend exited with code 1: error: invalid argument: --nope",
                                    from_states=["starting"], permanent=True)
    instance.refresh_from_db()
    assert (instance.state, instance.error_kind, instance.next_restart_at) == ("error", "permanent", None)
    assert instance.state_message.startswith("backend exited with code 1: error: invalid argument: --nope")
    assert "not restarted automatically" in instance.state_message
    assert free_ram(worker) == before + 4 * GIB
    assert not lifecycle.do_restart_instance(instance)


def test_transient_failure_keeps_its_claim_and_books_a_restart(placed):
    worker, _, instance = placed
    before = free_ram(worker)
    lifecycle.do_fail_instance(instance, "backend killed by signal SIGKILL", from_states=["starting"])
    instance.refresh_from_db()
    assert (instance.state, instance.error_kind) == ("error", "transient")
    assert instance.next_restart_at is not None and instance.state_message == "backend killed by signal SIGKILL"
    assert free_ram(worker) == before
    assert lifecycle.do_restart_instance(instance)
    instance.refresh_from_db()
    assert (instance.state, instance.error_kind, instance.restart_count) == ("scheduled", "", 1)


def test_editing_the_model_replaces_a_permanently_failed_instance(placed):
    _, model, instance = placed
    lifecycle.do_fail_instance(instance, "no .gguf file found at /m.gguf", from_states=["starting"], permanent=True)
    actions.do_update_model(model, {"description": "same config"})
    assert ModelInstance.objects.get().pk == instance.pk  # not a configuration change: still waiting for one
    actions.do_update_model(model, {"local_path": "/other.gguf"})
    [fresh] = ModelInstance.objects.all()
    assert fresh.pk != instance.pk and fresh.state == "pending" and fresh.error_kind == ""


def test_deleting_a_permanently_failed_instance_brings_a_fresh_one(placed):
    _, _, instance = placed
    lifecycle.do_fail_instance(instance, "unknown version", from_states=["starting"], permanent=True)
    actions.do_delete_instance(instance)
    [fresh] = ModelInstance.objects.all()
    assert fresh.pk != instance.pk and fresh.state == "pending"
