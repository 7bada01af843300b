"""A key's allowed models and limits are set through the API (/api/v1/keys) and the admin, a model's requests per
minute through the API, the admin and the Deploy/Edit form (under Advanced) — each refusing what the others refuse;
the dashboard shows each limit beside what was used of it."""

from datetime import timedelta

import pytest
from django.test import Client
from django.utils import timezone

from gateway_app.models import ApiKey, UsageMinute
from models_app import actions
from models_app.models import Model

pytestmark = pytest.mark.django_db


@pytest.fixture
def client(admin_user):
    client = Client()
    client.force_login(admin_user)
    return client


def test_the_api_issues_and_changes_a_keys_limits(api):
    created = api.post("/api/v1/keys", {"name": "team", "scope": "inference", "allowed_models": [" qwen", "qwen"],
                                        "requests_per_minute": 60, "tokens_per_day": 100000}, format="json")
    assert created.status_code == 201, created.data
    assert (created.data["allowed_models"], created.data["requests_per_minute"], created.data["tokens_per_minute"],
            created.data["tokens_per_day"]) == (["qwen"], 60, None, 100000)
    key_id = created.data["id"]
    patched = api.patch(f"/api/v1/keys/{key_id}", {"allowed_models": [], "tokens_per_minute": 5000,
                                                   "requests_per_minute": None}, format="json")
    assert patched.status_code == 200, patched.data
    key = ApiKey.objects.get(pk=key_id)
    assert (key.allowed_models, key.requests_per_minute, key.tokens_per_minute, key.tokens_per_day) == \
        ([], None, 5000, 100000)


@pytest.mark.parametrize("field, value, message", [
    ("allowed_models", "qwen", 'Expected a list of items but got type "str".'),
    ("allowed_models", ["qwen", ""], "This field may not be blank."),
    ("allowed_models", [{"name": "qwen"}], "Not a valid string."),
    ("allowed_models", ["q" * 256], "Ensure this field has no more than 255 characters."),
    ("requests_per_minute", 0, "Ensure this value is greater than or equal to 1."),
    ("tokens_per_minute", -5, "Ensure this value is greater than or equal to 1."),
    ("tokens_per_day", "lots", "A valid integer is required."),
])
def test_the_api_refuses_bad_limits_naming_the_field(api, field, value, message):
    answer = api.post("/api/v1/keys", {"name": "team", field: value}, format="json")
    assert answer.status_code == 400
    assert message in str(answer.data[field])
    assert not ApiKey.objects.filter(name="team").exists()


def test_the_admin_sets_a_new_keys_limits_and_refuses_zero(client, admin_user):
    form = {"name": "team", "user": admin_user.pk, "scope": "inference", "expires_at_0": "", "expires_at_1": "",
            "allowed_models": "qwen, llama", "requests_per_minute": "10", "tokens_per_minute": "",
            "tokens_per_day": ""}
    refused = client.post("/admin/gateway_app/apikey/add/", {**form, "requests_per_minute": "0"})
    assert refused.status_code == 200 and "Ensure this value is greater than or equal to 1." in refused.content.decode()
    assert client.post("/admin/gateway_app/apikey/add/", form).status_code == 302
    key = ApiKey.objects.get(name="team")
    assert (key.allowed_models, key.requests_per_minute, key.tokens_per_minute) == (["qwen", "llama"], 10, None)
    page = client.get(f"/admin/gateway_app/apikey/{key.pk}/change/").content.decode()
    assert 'value="qwen, llama"' in page and "Quotas and rate limits" in page
    assert "10 requests/min · models: qwen, llama" in client.get("/admin/gateway_app/apikey/").content.decode()


def test_a_models_requests_per_minute_is_set_on_the_form_the_api_and_the_admin(client, api):
    page = client.get("/models/deploy/").content.decode()
    assert '<label for="requests_per_minute">Requests per minute</label>' in page
    form = {"source": "local_path", "local_path": "/models/m.gguf", "name": "limited", "replicas": "1",
            "placement_strategy": "spread", "scheduling": "auto"}
    refused = client.post("/models/deploy/", {**form, "requests_per_minute": "0"})
    assert refused.status_code == 400
    assert refused.context["errors"]["requests_per_minute"] == ["Ensure this value is greater than or equal to 1."]
    assert client.post("/models/deploy/", {**form, "requests_per_minute": "120"}).status_code == 302
    model = Model.objects.get(name="limited")
    assert model.requests_per_minute == 120
    assert 'name="requests_per_minute" type="number" min="1" value="120"' in \
        client.get(f"/models/{model.pk}/edit/").content.decode()
    assert "每分钟请求数" in client.get("/models/deploy/", HTTP_ACCEPT_LANGUAGE="zh-hans").content.decode()

    patched = api.patch(f"/api/v1/models/{model.pk}", {"requests_per_minute": 30}, format="json")
    assert patched.status_code == 200 and patched.data["requests_per_minute"] == 30
    assert patched.data["config_version"] == model.config_version  # running instances are not outdated by it
    assert api.patch(f"/api/v1/models/{model.pk}", {"requests_per_minute": 0}, format="json").status_code == 400
    assert 'name="requests_per_minute"' in client.get(f"/admin/models_app/model/{model.pk}/change/").content.decode()


def test_the_dashboard_shows_limits_beside_usage(client, admin_user):
    key, _ = ApiKey.issue(admin_user, "team", requests_per_minute=600, tokens_per_day=100000,
                          allowed_models=["chat"])
    ApiKey.issue(admin_user, "free")
    actions.do_create_model(name="chat", source="local_path", local_path="/m.gguf", requests_per_minute=1000)
    now = timezone.now().replace(second=0, microsecond=0)
    for ago, requests in ((0, 40), (3, 120), (7, 90)):
        UsageMinute.objects.create(minute=now - timedelta(minutes=ago), api_key=key, model_name="chat",
                                   requests=requests, prompt_tokens=requests, completion_tokens=requests)
    page = client.get("/dashboard/").content.decode()
    assert f'<a href="/keys/{key.pk}/edit/"' in page
    assert "120 / 600 requests/min" in page  # the busiest minute of the hour
    assert "models: chat" in page
    assert "120 / 1000 requests/min" in page  # the model's row
    zh = client.get("/dashboard/", HTTP_ACCEPT_LANGUAGE="zh-hans").content.decode()
    assert "120 / 600 请求/分钟" in zh
