""""Sleep after minutes idle" is set on the Deploy/Edit form (under Advanced), the API and the admin; `asleep` and
`last_request_at` are read-only; the Models page shows a sleeping model as Asleep (休眠中)."""

import pytest
from django.test import Client

from models_app import actions
from models_app.models import Model

pytestmark = pytest.mark.django_db


@pytest.fixture
def client(admin_user):
    client = Client()
    client.force_login(admin_user)
    return client


def form(**extra) -> dict:
    return {"source": "local_path", "local_path": "/models/m.gguf", "name": "sleepy", "replicas": "1",
            "placement_strategy": "spread", "scheduling": "auto", **extra}


def test_the_form_sets_and_clears_the_option(client):
    page = client.get("/models/deploy/").content.decode()
    assert '<label for="sleep_after_minutes">Sleep after minutes idle</label>' in page

    assert client.post("/models/deploy/", form(sleep_after_minutes="15")).status_code == 302
    model = Model.objects.get(name="sleepy")
    assert model.sleep_after_minutes == 15
    assert 'name="sleep_after_minutes" type="number" min="1" value="15"' in \
        client.get(f"/models/{model.pk}/edit/").content.decode()

    assert client.post(f"/models/{model.pk}/edit/", form(sleep_after_minutes="")).status_code == 302
    model.refresh_from_db()
    assert model.sleep_after_minutes is None


def test_the_form_refuses_zero_minutes_next_to_the_field(client):
    response = client.post("/models/deploy/", form(sleep_after_minutes="0"))
    assert response.status_code == 400
    assert response.context["errors"]["sleep_after_minutes"] == ["Ensure this value is greater than or equal to 1."]


def test_the_api_writes_the_option_and_only_reads_asleep_and_last_request(api):
    created = api.post("/api/v1/models", {"name": "sleepy", "source": "local_path", "local_path": "/models/m.gguf",
                                          "sleep_after_minutes": 30}, format="json")
    assert created.status_code == 201, created.data
    assert (created.data["sleep_after_minutes"], created.data["asleep"], created.data["last_request_at"]) == \
        (30, False, None)
    model_id = created.data["id"]

    patched = api.patch(f"/api/v1/models/{model_id}", {"asleep": True, "last_request_at": "2020-01-01T00:00:00Z",
                                                       "sleep_after_minutes": None}, format="json")
    assert patched.status_code == 200
    assert (patched.data["sleep_after_minutes"], patched.data["asleep"], patched.data["last_request_at"]) == \
        (None, False, None)

    refused = api.patch(f"/api/v1/models/{model_id}", {"sleep_after_minutes": -5}, format="json")
    assert refused.status_code == 400 and "sleep_after_minutes" in refused.data


@pytest.mark.parametrize("language, word", [("en", "Asleep"), ("zh-hans", "休眠中")])
def test_the_models_page_shows_a_sleeping_model_as_asleep(client, language, word):
    model = actions.do_create_model(name="sleepy", source="local_path", local_path="/m.gguf", sleep_after_minutes=5)
    page = client.get("/", HTTP_ACCEPT_LANGUAGE=language).content.decode()
    assert word not in page
    actions.do_sleep_model(model, "test")
    page = client.get("/", HTTP_ACCEPT_LANGUAGE=language).content.decode()
    assert '<span class="tag asleep"' in page and f">{word}</span>" in page


def test_the_deploy_form_speaks_chinese(client):
    page = client.get("/models/deploy/", HTTP_ACCEPT_LANGUAGE="zh-hans").content.decode()
    assert '<label for="sleep_after_minutes">空闲多少分钟后休眠</label>' in page


def test_the_admin_edits_the_option_and_shows_the_state(client):
    model = actions.do_create_model(name="sleepy", source="local_path", local_path="/m.gguf", sleep_after_minutes=5)
    page = client.get(f"/admin/models_app/model/{model.pk}/change/").content.decode()
    assert 'name="sleep_after_minutes"' in page and "Last request at" in page and "Asleep" in page
