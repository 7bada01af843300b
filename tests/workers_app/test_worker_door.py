"""A worker node's own door: its assignments (main and RPC parts) and its reports, with the lifecycle they drive
for a distributed instance (a part ready, a part failed, a subordinate lost, a group restart)."""

from datetime import timedelta

import pytest
from django.test import Client
from django.utils import timezone

from models_app.models import Model, ModelInstance
from tests.factories import cpu_status
from workers_app.cluster import broker_url_for
from workers_app.models import Worker
from workers_app.tasks import mark_stale_workers

pytestmark = pytest.mark.django_db


def join(name: str) -> tuple[Worker, Client]:
    answer = Client(HTTP_AUTHORIZATION="Bearer test-cluster-token").post(
        "/api/v1/workers", {"name": name, "ip": f"10.0.0.{len(name)}", "status": cpu_status()},
        content_type="application/json").json()
    return Worker.objects.get(pk=answer["id"]), Client(HTTP_AUTHORIZATION="Bearer test-cluster-token",
                                                       HTTP_X_WORKER_CREDENTIAL=answer["credential"])


@pytest.fixture
def split():
    """A model placed across two workers: `main` runs llama-server, `sub` one RPC server (part 0)."""
    main, main_client = join("main")
    sub, sub_client = join("sub")
    model = Model.objects.create(name="big", source="local_path", local_path="/m/big.gguf", replicas=1)
    part = {"worker_id": sub.pk, "worker_name": sub.name, "gpu_indexes": [], "computed_resource_claim": {"ram": 1},
            "host": None, "port": None, "pid": None, "state": "pending", "attempt": 0}
    instance = ModelInstance.objects.create(model=model, name="big-1", worker=main, state="scheduled",
                                            computed_resource_claim={"ram": 2}, distributed_servers=[part])
    return {"main": main, "sub": sub, "main_client": main_client, "sub_client": sub_client, "instance": instance}


def report(client: Client, worker: Worker, **body):
    response = client.post(f"/api/v1/workers/{worker.pk}/reports", body, content_type="application/json")
    assert response.status_code == 200, response.content
    return response.json()


def test_both_workers_see_the_instance_with_their_role(split):
    main = split["main_client"].get(f"/api/v1/workers/{split['main'].pk}/assignments").json()["instances"]
    sub = split["sub_client"].get(f"/api/v1/workers/{split['sub'].pk}/assignments").json()["instances"]
    assert [(a["id"], a["role"]) for a in main] == [(split["instance"].pk, "main")]
    assert [(a["id"], a["role"]) for a in sub] == [(split["instance"].pk, "subordinate")]
    assert sub[0]["distributed_servers"][0]["worker_name"] == "sub" and sub[0]["backend_api_key"] == ""


def test_a_part_ready_is_recorded_for_its_attempt_only(split):
    sub, client, instance = split["sub"], split["sub_client"], split["instance"]
    stale = report(client, sub, event="part_ready", instance=instance.pk, index=0, attempt=7, host="10.0.0.3",
                   port=50052, pid=123)
    assert stale["applied"] is False
    ready = report(client, sub, event="part_ready", instance=instance.pk, index=0, attempt=0, host="10.0.0.3",
                   port=50052, pid=123)
    assert ready["applied"] is True
    [part] = ready["instance"]["distributed_servers"]
    assert (part["state"], part["host"], part["port"], part["pid"]) == ("ready", "10.0.0.3", 50052, 123)


def test_another_worker_cannot_report_for_a_part_it_does_not_run(split):
    answer = report(split["main_client"], split["main"], event="part_ready", instance=split["instance"].pk,
                    index=0, attempt=0, host="10.0.0.4", port=50052, pid=9)
    assert answer["applied"] is False
    assert ModelInstance.objects.get().distributed_servers[0]["state"] == "pending"


def test_a_failed_vllm_node_is_named_as_one(split):
    sub, instance = split["sub"], split["instance"]
    ModelInstance.objects.filter(pk=instance.pk).update(backend="vllm")
    report(split["sub_client"], sub, event="part_ready", instance=instance.pk, index=0, attempt=0,
           host="10.0.0.3", port=50052, pid=123)
    report(split["sub_client"], sub, event="part_failed", instance=instance.pk, index=0, attempt=0,
           message="exited with 1")
    instance.refresh_from_db()
    assert "vLLM node 1 on worker sub (port 50052): exited with 1" in instance.state_message


def test_a_failed_part_fails_the_instance_and_the_restart_starts_every_part_over(split):
    sub, instance = split["sub"], split["instance"]
    report(split["sub_client"], sub, event="part_ready", instance=instance.pk, index=0, attempt=0,
           host="10.0.0.3", port=50052, pid=123)
    failed = report(split["sub_client"], sub, event="part_failed", instance=instance.pk, index=0, attempt=0,
                    message="exited with -9")
    assert failed["applied"] is True
    instance.refresh_from_db()
    assert instance.state == "error" and "RPC server 0 on worker sub (port 50052): exited with -9" in \
        instance.state_message
    assert instance.events.order_by("-id").first().cause == "part_failed"
    assert instance.distributed_servers[0]["attempt"] == 1 and instance.distributed_servers[0]["port"] is None
    # the old attempt's late word changes nothing
    assert report(split["sub_client"], sub, event="part_failed", instance=instance.pk, index=0, attempt=0,
                  message="late")["applied"] is False
    ModelInstance.objects.filter(pk=instance.pk).update(next_restart_at=timezone.now() - timedelta(seconds=1))
    assignment = split["main_client"].get(f"/api/v1/workers/{split['main'].pk}/assignments").json()["instances"][0]
    assert assignment["restart_due"] is True
    restarted = report(split["main_client"], split["main"], event="restart", instance=instance.pk)
    assert restarted["applied"] is True and restarted["instance"]["state"] == "scheduled"
    assert restarted["instance"]["distributed_servers"][0]["attempt"] == 2
    assert restarted["instance"]["distributed_servers"][0]["state"] == "pending"


def test_a_restart_waits_for_no_one_when_a_part_worker_is_gone_it_places_again(split):
    instance = split["instance"]
    ModelInstance.objects.filter(pk=instance.pk).update(state="error", next_restart_at=timezone.now())
    Worker.objects.filter(pk=split["sub"].pk).update(state="not_ready")
    answer = report(split["main_client"], split["main"], event="restart", instance=instance.pk)
    assert answer["applied"] is False
    instance.refresh_from_db()
    assert instance.state == "pending" and instance.worker is None and instance.distributed_servers == []


def test_a_lost_subordinate_fails_its_instances_with_that_cause_and_places_them_again(split):
    instance = split["instance"]
    ModelInstance.objects.filter(pk=instance.pk).update(state="running")
    Worker.objects.filter(pk=split["sub"].pk).update(last_heartbeat_at=timezone.now() - timedelta(hours=1))
    assert mark_stale_workers() == 1
    instance.refresh_from_db()
    assert instance.state == "pending" and instance.distributed_servers == []
    causes = list(instance.events.order_by("id").values_list("to_state", "cause"))
    assert causes[-2:] == [("error", "part_lost"), ("pending", "moved")]


def test_the_main_worker_reports_only_for_instances_placed_on_it(split):
    answer = report(split["sub_client"], split["sub"], event="failed", instance=split["instance"].pk,
                    message="not mine")
    assert answer["applied"] is False and ModelInstance.objects.get().state == "scheduled"


def test_reports_are_checked_field_by_field(split):
    response = split["sub_client"].post(f"/api/v1/workers/{split['sub'].pk}/reports",
                                        {"event": "part_ready", "instance": split["instance"].pk},
                                        content_type="application/json")
    assert response.status_code == 400 and "index" in response.json()


def test_the_broker_address_follows_the_host_the_worker_reached(settings):
    settings.REDIS_URL = "redis://:secret@127.0.0.1:6390/0"
    assert broker_url_for("10.1.2.3") == "redis://:secret@10.1.2.3:6390/0"
    assert broker_url_for("127.0.0.1") == "redis://:secret@127.0.0.1:6390/0"
    settings.REDIS_URL = "redis://:secret@redis.internal:6379/1"
    assert broker_url_for("10.1.2.3") == "redis://:secret@redis.internal:6379/1"


def test_the_registration_answer_carries_the_broker(settings):
    settings.REDIS_URL = "redis://:secret@127.0.0.1:6390/0"
    answer = Client(HTTP_AUTHORIZATION="Bearer test-cluster-token", HTTP_HOST="10.9.8.7:8000").post(
        "/api/v1/workers", {"name": "far", "status": cpu_status()}, content_type="application/json")
    assert answer.status_code == 201 and answer.json()["broker_url"] == "redis://:secret@10.9.8.7:6390/0"
