"""A pass decides every instance in memory, then writes the decisions at once: the placements in one bulk write
with an event each, those that wait grouped by reason, and one launch message per worker queue."""

import pytest

from models_app import actions, lifecycle
from models_app.models import InstanceEvent, ModelInstance
from scheduler_app import scheduler
from scheduler_app.scheduler import pending_instance_ids, schedule_instances


@pytest.fixture
def launches(monkeypatch):
    sent: list[dict[str, list[int]]] = []
    monkeypatch.setattr(scheduler, "_send_launches", lambda by_queue: sent.append(by_queue))
    return sent


def test_one_launch_message_per_worker_for_a_whole_pass(register, llama_8b, launches,
                                                        django_capture_on_commit_callbacks):
    register("a", vram_gib=[24])
    register("b", vram_gib=[24])
    model = actions.do_create_model(name="m", source="local_path", local_path=str(llama_8b), replicas=4)
    with django_capture_on_commit_callbacks(execute=True):
        outcome = schedule_instances(pending_instance_ids())
    instances = list(ModelInstance.objects.filter(model=model).select_related("worker").order_by("id"))
    assert sorted(outcome.values()) == ["scheduled"] * 4
    by_worker: dict[str, list[int]] = {}
    for instance in instances:
        by_worker.setdefault(instance.worker.queue, []).append(instance.pk)
        assert instance.backend == "llama-box" and instance.backend_version and instance.computed_resource_claim
        assert instance.error_kind == ""
    assert launches == [{queue: sorted(ids) for queue, ids in by_worker.items()}]
    assert sorted(len(ids) for ids in by_worker.values()) == [2, 2]  # spread: two on each worker, one message each
    events = InstanceEvent.objects.filter(instance__model=model, cause="placed")
    assert sorted(events.values_list("instance_id", flat=True)) == [i.pk for i in instances]
    assert {(e.from_state, e.to_state) for e in events} == {("analyzing", "scheduled")}


def test_those_that_do_not_fit_wait_with_the_reason_and_the_rest_are_placed(register, llama_70b, launches):
    register("a", vram_gib=[48, 48], ram_gib=16)
    model = actions.do_create_model(name="m", source="local_path", local_path=str(llama_70b), replicas=3,
                                    cpu_offloading=False)
    outcome = schedule_instances(pending_instance_ids())
    assert sorted(outcome.values()) == ["pending", "scheduled", "scheduled"]
    [waiting] = ModelInstance.objects.filter(model=model, state="pending")
    assert waiting.state_message.startswith("no worker fits")
    assert InstanceEvent.objects.filter(instance=waiting, cause="no_fit", to_state="pending").count() == 1


def test_an_instance_deleted_while_the_pass_decides_is_not_written(register, llama_8b, launches, monkeypatch):
    register("a", vram_gib=[24, 24])
    model = actions.do_create_model(name="m", source="local_path", local_path=str(llama_8b), replicas=2)
    first, second = ModelInstance.objects.filter(model=model).order_by("id")
    real = lifecycle.do_place_many

    def delete_first_then_write(placements):
        ModelInstance.objects.filter(pk=first.pk).delete()  # a user's delete, just before the write
        return real(placements)

    monkeypatch.setattr(scheduler, "do_place_many", delete_first_then_write)
    outcome = schedule_instances([first.pk, second.pk])
    assert outcome == {first.pk: "gone", second.pk: "scheduled"}
    assert list(ModelInstance.objects.filter(model=model).values_list("pk", "state")) == [(second.pk, "scheduled")]


@pytest.mark.django_db
def test_a_placement_may_only_set_placement_fields():
    with pytest.raises(lifecycle.IllegalTransition, match="does not set state"):
        lifecycle.do_place_many([(ModelInstance(pk=1), "m", {"state": "running"})])


def test_the_launch_message_reaches_the_worker_queue_as_a_task():
    from workers_app.tasks import launch_instances

    scheduler._send_launches({"worker.batch-a": [3, 1], "worker.batch-b": [2]})
    with launch_instances.app.connection_for_read() as connection:
        for queue, ids in (("worker.batch-a", [1, 3]), ("worker.batch-b", [2])):
            with connection.SimpleQueue(queue) as inbox:
                message = inbox.get(timeout=5)
                message.ack()
                assert message.headers["task"] == "workers_app.tasks.launch_instances"
                assert message.payload[0] == [ids] and message.payload[1] == {}
