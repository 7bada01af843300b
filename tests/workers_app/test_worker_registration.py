"""Workers join with the cluster token, heartbeat, and go not_ready when silent."""

from datetime import timedelta

import pytest
from django.utils import timezone
from rest_framework.test import APIClient

from models_app.models import Model, ModelInstance
from tests.factories import cpu_status, make_worker
from workers_app.models import Worker
from workers_app.tasks import mark_stale_workers

pytestmark = pytest.mark.django_db


def token_client(token="test-cluster-token"):
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {token}")
    return client


def test_worker_registers_with_the_cluster_token():
    response = token_client().post("/api/v1/workers", {"name": "w1", "ip": "10.0.0.5", "labels": {"zone": "a"},
                                                       "status": cpu_status(32)}, format="json")
    assert response.status_code == 201, response.data
    worker = Worker.objects.get(name="w1")
    assert worker.state == "ready"
    assert worker.ram_total == 32 * 1024**3
    assert worker.labels == {"zone": "a"}


def test_registering_again_with_its_credential_updates_the_same_worker():
    first = token_client().post("/api/v1/workers", {"name": "w1", "status": cpu_status(8)}, format="json").json()
    again = token_client().post("/api/v1/workers", {"name": "w1", "status": cpu_status(16)}, format="json",
                                HTTP_X_WORKER_CREDENTIAL=first["credential"])
    assert again.status_code == 201 and "credential" not in again.json()
    assert Worker.objects.count() == 1
    assert Worker.objects.get().ram_total == 16 * 1024**3


def test_the_cluster_token_alone_cannot_take_over_a_live_worker():
    first = token_client().post("/api/v1/workers", {"name": "vm", "ip": "10.0.0.5", "status": cpu_status()},
                                format="json").json()
    impostor = token_client().post("/api/v1/workers", {"name": "vm", "ip": "10.6.6.6", "status": cpu_status()},
                                   format="json")
    assert impostor.status_code == 409 and "registered and alive" in impostor.json()["detail"]
    assert Worker.objects.get(name="vm").ip == "10.0.0.5"
    beat = token_client().post(f"/api/v1/workers/{first['id']}/heartbeat", {}, format="json")
    assert beat.status_code == 403  # nor keep it alive
    assert token_client().post(f"/api/v1/workers/{first['id']}/heartbeat", {}, format="json",
                               HTTP_X_WORKER_CREDENTIAL=first["credential"]).status_code == 200


def test_a_name_whose_worker_is_gone_can_be_taken_with_a_new_credential():
    first = token_client().post("/api/v1/workers", {"name": "vm", "status": cpu_status()}, format="json").json()
    Worker.objects.filter(name="vm").update(state="not_ready", last_heartbeat_at=timezone.now() - timedelta(hours=1))
    taken = token_client().post("/api/v1/workers", {"name": "vm", "ip": "10.0.0.9", "status": cpu_status()},
                                format="json")
    assert taken.status_code == 201 and taken.json()["credential"] != first["credential"]


def test_wrong_token_cannot_register():
    response = token_client("wrong").post("/api/v1/workers", {"name": "w1"}, format="json")
    assert response.status_code in (401, 403)
    assert not Worker.objects.exists()


def test_api_key_is_not_a_cluster_token(api):
    assert api.post("/api/v1/workers", {"name": "w1"}, format="json").status_code in (401, 403)


def test_heartbeat_refreshes_the_worker():
    worker = make_worker("w1", last_heartbeat_at=timezone.now() - timedelta(seconds=30))
    response = token_client().post(f"/api/v1/workers/{worker.pk}/heartbeat", {"status": cpu_status(4)},
                                   format="json")
    assert response.status_code == 200
    worker.refresh_from_db()
    assert timezone.now() - worker.last_heartbeat_at < timedelta(seconds=5)
    assert worker.ram_total == 4 * 1024**3


def test_silent_worker_becomes_not_ready_and_its_instances_move_elsewhere():
    silent = make_worker("silent", last_heartbeat_at=timezone.now() - timedelta(seconds=61))
    fresh = make_worker("fresh")
    model = Model.objects.create(name="m", source="local_path", local_path="/m.gguf")
    instance = ModelInstance.objects.create(model=model, name="m-1", worker=silent, state="running")
    assert mark_stale_workers() == 1
    silent.refresh_from_db()
    fresh.refresh_from_db()
    instance.refresh_from_db()
    assert silent.state == "not_ready"
    assert fresh.state == "ready"
    assert (instance.state, instance.state_message) == ("unreachable", "worker silent is not ready")
    mark_stale_workers()  # the next run: still silent, so it is placed elsewhere
    instance.refresh_from_db()
    assert (instance.state, instance.worker) == ("pending", None)
    assert instance.state_message == "worker silent stopped answering; placing the instance elsewhere"
    assert [(e.from_state, e.to_state, e.cause) for e in instance.events.all()] == [
        ("running", "unreachable", "worker_lost"), ("unreachable", "pending", "moved")]


def test_operator_edits_labels(api):
    worker = make_worker("w1", labels={"zone": "a"})
    response = api.patch(f"/api/v1/workers/{worker.pk}", {"labels": {"zone": "b"}}, format="json")
    assert response.status_code == 200, response.data
    assert response.data["labels"] == {"zone": "b"}
    assert response.data["name"] == "w1"


def test_gpu_list_names_gpus_by_worker_and_index(api):
    from tests.factories import gpu_status

    make_worker("g1", status=gpu_status([24, 24]))
    ids = [g["id"] for g in api.get("/api/v1/gpus").data]
    assert ids == ["g1:0", "g1:1"]
