"""Deleting an instance keeps its history: a last event, `deleted`, says why and by whom (a user's delete, the model's
delete, a scale-down, a model put to sleep, an edit replacing an instance failed for good), with the instance's name,
model and worker kept beside it. The events API and the instance page still answer for it (the page built from the
events, ending in Deleted), the Models page links to the deleted instances, and retention prunes them like any."""

from datetime import timedelta

import pytest
from django.test import Client
from django.utils import timezone

from models_app import actions, lifecycle
from models_app.models import InstanceEvent, Model, ModelInstance
from tests.factories import make_worker

pytestmark = pytest.mark.django_db(transaction=True)  # each action commits: no constraint may refuse it (PostgreSQL)


@pytest.fixture
def client(admin_user):
    client = Client()
    client.force_login(admin_user)
    return client


def running_instance(name: str = "m", replicas: int = 1) -> ModelInstance:
    worker = make_worker("w")
    model = actions.do_create_model(name=name, source="local_path", local_path="/m.gguf", replicas=replicas)
    instance = ModelInstance.objects.filter(model=model).order_by("id").first()
    lifecycle.do_begin_analysis([instance.pk])
    lifecycle.do_place(instance, "placed on w", worker=worker)
    lifecycle.do_begin_start(instance, "w")
    lifecycle.do_mark_running(instance)
    return instance


def history(client, pk: int) -> list[dict]:
    response = client.get(f"/api/v1/instances/{pk}/events")
    assert response.status_code == 200, response.content
    return response.json()


def test_a_deleted_instance_keeps_its_history_in_the_api_and_on_its_page(client):
    instance = running_instance()
    assert client.post(f"/instances/{instance.pk}/delete/").status_code == 302
    assert not ModelInstance.objects.filter(pk=instance.pk).exists()

    events = history(client, instance.pk)
    assert [(e["cause"], e["to_state"]) for e in events] == [
        ("analyzing", "analyzing"), ("placed", "scheduled"), ("start", "starting"), ("healthy", "running"),
        ("deleted", "deleted")]
    gone = events[-1]
    assert gone["from_state"] == "running"
    assert gone["message"] == "deleted by admin; the model's replica count brings a new instance"
    assert gone["details"] == {"instance_name": instance.name, "model_id": instance.model_id, "model_name": "m",
                               "worker_name": "w"}

    page = client.get(f"/instances/{instance.pk}/")
    assert page.status_code == 200
    html = page.content.decode()
    assert f"Instance · {instance.name}" in html and "deleted by admin" in html
    timeline = html[html.index('<ol class="timeline">'):]
    order = [timeline.index(f'data-cause="{cause}"') for cause in ("analyzing", "placed", "healthy", "deleted")]
    assert order == sorted(order) and timeline.rindex("<li ") == timeline.index('<li data-cause="deleted"')
    assert "<strong>Deleted</strong>" in timeline
    zh = client.get(f"/instances/{instance.pk}/", HTTP_ACCEPT_LANGUAGE="zh-CN").content.decode()
    assert "已删除" in zh

    # Reachable: the Models page links the model's deleted instances, and they link the page.
    models = client.get("/").content.decode()
    assert f'href="/instances/deleted/?model={instance.model_id}"' in models
    listed = client.get(f"/instances/deleted/?model={instance.model_id}").content.decode()
    assert f'href="/instances/{instance.pk}/"' in listed and "deleted by admin" in listed
    api = client.get("/api/v1/instances/deleted", {"model": instance.model_id}).json()
    assert [(d["id"], d["name"], d["model_name"], d["state"]) for d in api] == [
        (instance.pk, instance.name, "m", "running")]

    # The replacement is a new instance with a history of its own.
    [replacement] = ModelInstance.objects.filter(model=instance.model_id)
    assert replacement.pk != instance.pk and client.get(f"/instances/{replacement.pk}/").status_code == 200


def test_nothing_is_recorded_for_an_instance_after_its_deletion(client):
    instance = running_instance()
    actions.do_delete_instance(instance)
    assert not lifecycle.do_fail_instance(instance, "late news", from_states=["running"])
    assert history(client, instance.pk)[-1]["cause"] == "deleted"
    assert client.get("/api/v1/instances/999999/events").status_code == 404  # never existed
    assert client.get("/instances/999999/").status_code == 404


def test_a_model_delete_a_scale_down_and_a_sleep_say_so(client):
    scaled = running_instance(replicas=2)
    model = Model.objects.get(pk=scaled.model_id)
    [other] = ModelInstance.objects.filter(model=model).exclude(pk=scaled.pk)
    assert client.post(f"/api/v1/models/{model.pk}/stop").status_code == 200
    assert {e.message for e in InstanceEvent.objects.filter(cause="deleted")} == {"its model was stopped by admin"}

    actions.do_scale_model(model, 1)
    [sleeper] = ModelInstance.objects.filter(model=model)
    Model.objects.filter(pk=model.pk).update(sleep_after_minutes=1)
    assert actions.do_sleep_model(Model.objects.get(pk=model.pk), "no request for 5 min")
    assert history(client, sleeper.pk)[-1]["message"] == "its model was put to sleep: no request for 5 min"

    Model.objects.filter(pk=model.pk).update(asleep=False)
    actions.do_scale_model(model, 1)
    [last] = ModelInstance.objects.filter(model=model)
    assert client.delete(f"/api/v1/models/{model.pk}").status_code == 204
    gone = history(client, last.pk)[-1]
    assert gone["message"] == "its model m was deleted by admin" and gone["details"]["model_name"] == "m"
    page = client.get(f"/instances/{last.pk}/").content.decode()
    assert "its model m was deleted by admin" in page and "/models/" not in page.split("<h1>")[1].split("</p>")[0]
    everything = client.get("/api/v1/instances/deleted").json()
    assert {d["id"] for d in everything} == {scaled.pk, other.pk, sleeper.pk, last.pk}
    assert "its model m was deleted by admin" in client.get("/instances/deleted/").content.decode()


def test_an_edit_replacing_an_instance_failed_for_good_says_so(client):
    instance = running_instance()
    lifecycle.do_fail_instance(instance, "bad flag", from_states=["running"], permanent=True)
    actions.do_update_model(Model.objects.get(pk=instance.model_id), {"backend_parameters": ["--ctx-size", "64"]},
                            by="ops")
    gone = history(client, instance.pk)[-1]
    assert (gone["cause"], gone["from_state"]) == ("deleted", "error")
    assert gone["message"] == ("its model was edited by ops: failed for good, it is replaced by an instance with the "
                               "new configuration")


def test_retention_prunes_a_deleted_instances_history(client):
    instance = running_instance()
    actions.do_delete_instance(instance, by="ops")
    InstanceEvent.objects.filter(instance_id=instance.pk).update(time=timezone.now() - timedelta(days=30))
    assert lifecycle.do_prune_events(keep_days=14) == 5
    assert not InstanceEvent.objects.filter(instance_id=instance.pk).exists()
    assert client.get(f"/api/v1/instances/{instance.pk}/events").status_code == 404
    assert client.get(f"/instances/{instance.pk}/").status_code == 404
    assert client.get("/api/v1/instances/deleted").json() == []
