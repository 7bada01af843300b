"""A model with "sleep after N minutes idle" is put to sleep by the beat once it has had no request for N minutes:
its instances are deleted (their claims freed) and it wants none until a request wakes it. A busy model, one still
starting, and one without the option are left alone."""

from datetime import timedelta

import pytest
from django.utils import timezone

from models_app import actions
from models_app.models import Model, ModelInstance
from scheduler_app.pool import read_pool
from scheduler_app.tasks import sleep_idle_models
from tests.factories import GIB, cpu_status, make_worker

pytestmark = pytest.mark.django_db


def deployed(name: str, worker, *, sleep_after: int | None, idle_minutes: float, replicas: int = 1,
             state: str = "running") -> Model:
    """A model whose instances run on `worker` (1 GiB of RAM each), last asked `idle_minutes` ago."""
    model = actions.do_create_model(name=name, source="local_path", local_path="/m.gguf", replicas=replicas,
                                    sleep_after_minutes=sleep_after)
    long_ago = timezone.now() - timedelta(hours=5)
    ModelInstance.objects.filter(model=model).update(
        state=state, worker=worker, port=40000, computed_resource_claim={"ram": GIB, "vram": {}},
        running_since=long_ago if state == "running" else None)
    Model.objects.filter(pk=model.pk).update(created_at=long_ago,
                                             last_request_at=timezone.now() - timedelta(minutes=idle_minutes))
    model.refresh_from_db()
    return model


def free_ram(worker) -> int:
    return next(r.ram_free for r in read_pool() if r.worker.pk == worker.pk)


def test_an_idle_model_is_put_to_sleep_its_instances_deleted_and_their_memory_freed():
    worker = make_worker("w1", status=cpu_status(16))
    before = free_ram(worker)
    idle = deployed("idle", worker, sleep_after=10, idle_minutes=11, replicas=2)
    assert free_ram(worker) == before - 2 * GIB

    assert sleep_idle_models() == ["idle"]

    idle.refresh_from_db()
    assert idle.asleep and idle.replicas == 2  # the count it wakes to is kept
    assert not ModelInstance.objects.filter(model=idle).exists()
    assert free_ram(worker) == before


def test_a_model_asked_within_its_minutes_stays_awake():
    worker = make_worker("w1")
    busy = deployed("busy", worker, sleep_after=10, idle_minutes=9)
    assert sleep_idle_models() == []
    busy.refresh_from_db()
    assert not busy.asleep and ModelInstance.objects.filter(model=busy).count() == 1


def test_a_model_without_the_option_never_sleeps():
    worker = make_worker("w1")
    plain = deployed("plain", worker, sleep_after=None, idle_minutes=60 * 24)
    assert sleep_idle_models() == []
    plain.refresh_from_db()
    assert not plain.asleep and ModelInstance.objects.filter(model=plain).count() == 1


def test_a_model_never_asked_counts_from_when_its_replica_began_running():
    worker = make_worker("w1")
    fresh = deployed("fresh", worker, sleep_after=10, idle_minutes=0)
    recently = timezone.now() - timedelta(minutes=3)
    Model.objects.filter(pk=fresh.pk).update(last_request_at=None)
    ModelInstance.objects.filter(model=fresh).update(running_since=recently)
    assert sleep_idle_models() == []
    ModelInstance.objects.filter(model=fresh).update(running_since=recently - timedelta(minutes=8))
    assert sleep_idle_models() == ["fresh"]


def test_a_model_whose_replica_is_still_starting_is_not_put_to_sleep():
    worker = make_worker("w1")
    starting = deployed("starting", worker, sleep_after=1, idle_minutes=30, state="downloading")
    assert sleep_idle_models() == []
    starting.refresh_from_db()
    assert not starting.asleep


def test_a_sleeping_model_wants_no_replicas_until_it_wakes():
    worker = make_worker("w1")
    model = deployed("sleepy", worker, sleep_after=5, idle_minutes=6)
    assert sleep_idle_models() == ["sleepy"]

    actions.do_update_model(model, {"replicas": 3})  # scaled while asleep: nothing starts
    actions.do_sync_replicas(model)
    assert not ModelInstance.objects.filter(model=model).exists()

    assert actions.do_wake_model(model.pk)
    model.refresh_from_db()
    assert not model.asleep and model.last_request_at > timezone.now() - timedelta(minutes=1)
    assert ModelInstance.objects.filter(model=model, state="pending").count() == 3
    assert not actions.do_wake_model(model.pk)  # awake already: nothing more is created
    assert ModelInstance.objects.filter(model=model).count() == 3


def test_start_wakes_a_sleeping_model_and_removing_the_option_does_too():
    worker = make_worker("w1")
    first = deployed("first", worker, sleep_after=5, idle_minutes=6)
    second = deployed("second", worker, sleep_after=5, idle_minutes=6)
    assert sorted(sleep_idle_models()) == ["first", "second"]

    actions.do_scale_model(first, 1)
    actions.do_update_model(second, {"sleep_after_minutes": None})

    for model in (first, second):
        model.refresh_from_db()
        assert not model.asleep
        assert ModelInstance.objects.filter(model=model).count() == 1
