"""Scaling picks the least useful victims; edits mark running instances outdated; deletes are idempotent;
failures book their restart with exponential backoff."""

from datetime import timedelta

import pytest
from django.utils import timezone

from models_app import actions, lifecycle
from models_app.models import Model, ModelInstance
from tests.factories import make_worker

pytestmark = pytest.mark.django_db


@pytest.fixture
def model():
    return actions.do_create_model(name="m", source="local_path", local_path="/m.gguf", replicas=0)


def instance(model, state, worker=None, offload=(33, 33)):
    return ModelInstance.objects.create(model=model, name=f"m-{state}-{offload[0]}", state=state, worker=worker,
                                        computed_resource_claim={"offload_layers": offload[0],
                                                                 "total_layers": offload[1]})


def test_scale_down_removes_broken_then_waiting_then_cpu_offloaded(model):
    worker = make_worker("w")
    gpu = instance(model, "running", worker)
    offloaded = instance(model, "running", worker, offload=(10, 33))
    starting = instance(model, "starting", worker)
    pending = instance(model, "pending")
    broken = instance(model, "error", worker)
    Model.objects.filter(pk=model.pk).update(replicas=5)
    model.refresh_from_db()
    survivors = []
    for replicas, gone in ((4, broken), (3, pending), (2, starting), (1, offloaded)):
        actions.do_scale_model(model, replicas)
        survivors = set(ModelInstance.objects.values_list("pk", flat=True))
        assert gone.pk not in survivors
    assert survivors == {gpu.pk}


def test_editing_replicas_scales_but_does_not_outdate(model):
    actions.do_update_model(model, {"replicas": 2, "description": "two"})
    assert ModelInstance.objects.count() == 2
    assert not any(i.outdated for i in ModelInstance.objects.select_related("model"))


def test_editing_the_configuration_leaves_instances_and_marks_them_outdated(model):
    actions.do_scale_model(model, 1)
    [old] = ModelInstance.objects.all()
    actions.do_update_model(model, {"backend_parameters": ["--ctx-size", "1024"]})
    old.refresh_from_db()
    assert old.state == "pending" and old.outdated
    actions.do_delete_instance(old)
    [new] = ModelInstance.objects.select_related("model")
    assert new.pk != old.pk and not new.outdated


def test_deleting_a_model_twice_is_harmless(model):
    actions.do_scale_model(model, 2)
    stale_copy = Model.objects.get(pk=model.pk)
    actions.do_delete_model(model)
    actions.do_delete_model(stale_copy)
    assert not Model.objects.exists() and not ModelInstance.objects.exists()


def test_deleting_an_instance_twice_replaces_it_once(model):
    actions.do_scale_model(model, 1)
    [first] = ModelInstance.objects.all()
    actions.do_delete_instance(first)
    actions.do_delete_instance(first)
    [replacement] = ModelInstance.objects.all()
    assert replacement.pk > first.pk


def test_instance_ids_are_never_reused(model):
    actions.do_scale_model(model, 1)
    last = ModelInstance.objects.get().pk
    actions.do_scale_model(model, 0)
    actions.do_scale_model(model, 1)
    assert ModelInstance.objects.get().pk > last


@pytest.mark.parametrize(("restarts", "delay"), [(0, 0), (1, 10), (2, 20), (3, 40), (5, 160), (6, 300), (20, 300)])
def test_restart_backoff_doubles_up_to_five_minutes(restarts, delay):
    assert lifecycle.restart_delay(restarts) == delay


def test_failure_books_the_restart_and_restart_counts_it(model):
    worker = make_worker("w")
    broken = instance(model, "running", worker)
    ModelInstance.objects.filter(pk=broken.pk).update(restart_count=2)
    broken.refresh_from_db()
    before = timezone.now()
    assert lifecycle.do_fail_instance(broken, "backend killed by signal SIGKILL", from_states=["running"])
    broken.refresh_from_db()
    assert broken.state == "error"
    assert timedelta(seconds=19) < broken.next_restart_at - before < timedelta(seconds=21)
    assert lifecycle.do_restart_instance(broken)
    broken.refresh_from_db()
    assert (broken.state, broken.restart_count, broken.next_restart_at) == ("scheduled", 3, None)
    assert broken.last_restart_at >= before


def test_no_restart_is_booked_when_the_model_says_so(model):
    Model.objects.filter(pk=model.pk).update(restart_on_error=False)
    broken = instance(model, "running", make_worker("w"))
    lifecycle.do_fail_instance(broken, "crashed", from_states=["running"])
    broken.refresh_from_db()
    assert broken.state == "error" and broken.next_restart_at is None


def test_restart_count_is_forgiven_only_after_a_long_clean_run(model):
    running = instance(model, "running", make_worker("w"))
    ModelInstance.objects.filter(pk=running.pk).update(restart_count=4, running_since=timezone.now())
    assert not lifecycle.do_forgive_restarts(running)
    ModelInstance.objects.filter(pk=running.pk).update(running_since=timezone.now() - timedelta(minutes=11))
    assert lifecycle.do_forgive_restarts(running)
    running.refresh_from_db()
    assert running.restart_count == 0
