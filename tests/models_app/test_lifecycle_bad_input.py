"""Bad lifecycle requests get a clear 4xx and change nothing."""

import pytest

from models_app import actions
from models_app.models import Model, ModelInstance

pytestmark = pytest.mark.django_db


@pytest.fixture
def model():
    return actions.do_create_model(name="m", source="local_path", local_path="/m.gguf", replicas=1)


def test_negative_replicas_in_an_edit_are_refused(api, model):
    response = api.patch(f"/api/v1/models/{model.pk}", {"replicas": -2}, format="json")
    assert response.status_code == 400 and "replicas" in response.data
    assert Model.objects.get().replicas == 1 and ModelInstance.objects.count() == 1


def test_stop_or_start_on_a_deleted_model_is_404(api, model):
    actions.do_delete_model(model)
    assert api.post(f"/api/v1/models/{model.pk}/stop").status_code == 404
    assert api.post(f"/api/v1/models/{model.pk}/start").status_code == 404


def test_deleting_an_unknown_instance_is_404(api, model):
    assert api.delete("/api/v1/instances/424242").status_code == 404
    assert ModelInstance.objects.count() == 1


def test_instances_show_their_restart_state(api, model):
    data = api.get("/api/v1/instances").data[0]
    assert {"restart_count", "last_restart_at", "next_restart_at", "outdated"} <= set(data)
