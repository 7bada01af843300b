"""AIMIND_EVICT_IDLE_MODELS: an instance that no worker has room for gets it from idle models that sleep, the least
recently used first, and only those whose room it needs (the scheduler's own evaluation decides); the next pass
places it. Off, or with no idle model that opted into sleeping, nothing is put to sleep."""

from datetime import timedelta

import pytest
from django.utils import timezone

from models_app import actions
from models_app.models import InstanceEvent, Model, ModelInstance
from scheduler_app.estimate import estimate_model
from scheduler_app.scheduler import pending_instance_ids, schedule_instances
from tests.factories import GIB, cpu_status, make_worker
from tests.fixtures.tiny_gguf import write_tiny_llama

pytestmark = pytest.mark.django_db


@pytest.fixture
def cluster(tmp_path, settings):
    """Two workers, zone a and zone b, each with room for one instance of the tiny model."""
    settings.EVICT_IDLE_MODELS, settings.EVICT_IDLE_AFTER = True, 60
    path = write_tiny_llama(tmp_path / "m.gguf")
    probe = actions.do_create_model(name="probe", source="local_path", local_path=str(path), replicas=0)
    claim = estimate_model(probe).claim(offload_layers=0, gpu_count=0).ram
    actions.do_delete_model(probe)
    for zone in ("a", "b"):
        make_worker(f"w-{zone}", status=cpu_status(1.5 * claim / GIB), labels={"zone": zone})
    return path


def running(path, name: str, *, zone: str, idle_minutes: float, sleep_after: int | None = 30) -> Model:
    model = actions.do_create_model(name=name, source="local_path", local_path=str(path),
                                    worker_selector={"zone": zone}, sleep_after_minutes=sleep_after)
    schedule_instances(pending_instance_ids())
    [instance] = ModelInstance.objects.filter(model=model)
    assert instance.state == "scheduled" and instance.worker.labels == {"zone": zone}, instance.state_message
    then = timezone.now() - timedelta(minutes=idle_minutes)
    ModelInstance.objects.filter(pk=instance.pk).update(state="running", running_since=then)
    Model.objects.filter(pk=model.pk).update(last_request_at=then, created_at=then)
    return model


def waiting(path, name: str = "new", **fields) -> ModelInstance:
    model = actions.do_create_model(name=name, source="local_path", local_path=str(path), **fields)
    schedule_instances(pending_instance_ids())
    return ModelInstance.objects.get(model=model)


def asleep(*models: Model) -> list[bool]:
    return [Model.objects.get(pk=m.pk).asleep for m in models]


def test_the_least_recently_used_idle_model_is_put_to_sleep_and_the_waiting_instance_placed(cluster):
    old = running(cluster, "old", zone="a", idle_minutes=20)
    recent = running(cluster, "recent", zone="b", idle_minutes=5)

    new = waiting(cluster)

    assert asleep(old, recent) == [True, False]
    assert not ModelInstance.objects.filter(model=old).exists()
    new.refresh_from_db()
    assert new.state == "pending" and "old" in new.state_message
    event = InstanceEvent.objects.filter(instance=new, cause="made_room").get()
    assert "put idle model(s) old to sleep" in event.message

    schedule_instances(pending_instance_ids())  # the pass their stop brings
    new.refresh_from_db()
    assert new.state == "scheduled" and new.worker.name == "w-a"


def test_only_a_model_whose_room_helps_is_put_to_sleep(cluster):
    old = running(cluster, "old", zone="a", idle_minutes=20)
    recent = running(cluster, "recent", zone="b", idle_minutes=5)

    new = waiting(cluster, worker_selector={"zone": "b"})  # the older one's room, in zone a, would not do

    assert asleep(old, recent) == [False, True]
    schedule_instances(pending_instance_ids())
    new.refresh_from_db()
    assert new.state == "scheduled" and new.worker.name == "w-b"


def test_models_used_within_a_minute_or_without_the_option_are_never_put_to_sleep(cluster):
    just_used = running(cluster, "just-used", zone="a", idle_minutes=0.2)
    plain = running(cluster, "plain", zone="b", idle_minutes=60, sleep_after=None)

    new = waiting(cluster)

    assert asleep(just_used, plain) == [False, False]
    assert new.state == "pending" and not InstanceEvent.objects.filter(instance=new, cause="made_room").exists()


def test_off_by_default_nothing_is_put_to_sleep(cluster, settings):
    settings.EVICT_IDLE_MODELS = False
    old = running(cluster, "old", zone="a", idle_minutes=20)
    recent = running(cluster, "recent", zone="b", idle_minutes=5)

    new = waiting(cluster)

    assert asleep(old, recent) == [False, False]
    assert new.state == "pending" and "no worker fits" in new.state_message
