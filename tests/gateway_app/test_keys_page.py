"""The API keys page (/keys/): every key with its state, allowed models, limits and today's usage; New key shows its
secret once and the key works; a bad field is refused next to it with the API's words and nothing is created;
Edit changes limits and allowed models; Revoke stops the key; only an admin gets in; the page speaks Chinese."""

from datetime import timedelta

import pytest
from django.contrib.auth import get_user_model
from django.test import Client
from django.utils import timezone

from gateway_app.models import ApiKey, Usage
from models_app import actions

pytestmark = pytest.mark.django_db

NEW_KEY = {"name": "team", "scope": "inference", "expires_at": "", "requests_per_minute": "60",
           "tokens_per_minute": "", "tokens_per_day": "100000"}


@pytest.fixture
def client(admin_user):
    client = Client()
    client.force_login(admin_user)
    return client


@pytest.fixture
def models():
    for name in ("chat", "embed"):
        actions.do_create_model(name=name, source="local_path", local_path=f"/{name}.gguf", replicas=0)


def row_of(page: str, name: str) -> str:
    start = page.index(f'<tr data-key="{name}"')
    return page[start:page.index("</tr>", start)]


def test_the_list_shows_each_keys_state_models_limits_and_usage_today(client, admin_user):
    team, _ = ApiKey.issue(admin_user, "team", scope="inference", allowed_models=["chat"], requests_per_minute=60,
                           tokens_per_minute=5000, tokens_per_day=100000)
    ApiKey.issue(admin_user, "free")
    old, _ = ApiKey.issue(admin_user, "old", expires_at=timezone.now() - timedelta(days=1))
    gone, _ = ApiKey.issue(admin_user, "gone")
    gone.revoke()
    today = timezone.now().date()
    Usage.objects.create(day=today, api_key=team, model_name="chat", requests=7, prompt_tokens=100,
                         completion_tokens=23)
    Usage.objects.create(day=today - timedelta(days=1), api_key=team, model_name="chat", requests=50)

    page = client.get("/keys/").content.decode()
    row = row_of(page, "team")
    assert f"<code>{team.key_prefix}…</code>" in row and "Gateway (/v1) only" in row
    assert '<span class="tag">chat</span>' in row
    assert "60 requests/min" in row and "5000 tokens/min" in row and "100000 tokens/day" in row
    assert "7 requests · 123 tokens" in row  # today only
    assert 'data-key-state="active">Active<' in row and f'href="/keys/{team.pk}/edit/"' in row
    free = row_of(page, "free")
    assert "every model" in free and "no limit" in free and "0 requests · 0 tokens" in free
    assert 'data-key-state="expired">Expired<' in row_of(page, "old")
    revoked = row_of(page, "gone")
    assert 'data-key-state="revoked">Revoked<' in revoked and "Revoke" not in revoked.replace("Revoked", "")
    assert page.index('data-key="gone"') > page.index('data-key="team"')  # revoked keys last
    assert '<a href="/keys/" aria-current="page">API keys</a>' in page


def test_a_new_key_is_shown_once_and_works(client, admin_user, models):
    form = client.get("/keys/new/").content.decode()
    assert '<input type="checkbox" name="allowed_models" value="chat"' in form
    assert '<input type="radio" name="scope" value="inference" checked>' in form
    created = client.post("/keys/new/", {**NEW_KEY, "allowed_models": ["chat"]})
    assert created.status_code == 200
    assert "no-store" in created["Cache-Control"]
    page = created.content.decode()
    assert "Copy it now: it is not shown again." in page
    raw = created.context["raw"]
    assert f'value="{raw}"' in page
    key = ApiKey.find(raw)
    assert key is not None and key.name == "team" and key.user == admin_user
    assert (key.scope, key.allowed_models, key.requests_per_minute, key.tokens_per_minute, key.tokens_per_day) == \
        ("inference", ["chat"], 60, None, 100000)
    listed = client.get("/keys/").content.decode()
    assert raw not in listed and "60 requests/min" in row_of(listed, "team")
    assert Client(HTTP_AUTHORIZATION=f"Bearer {raw}").get("/v1/models").status_code == 200


def test_a_new_key_may_expire(client):
    client.post("/keys/new/", {**NEW_KEY, "expires_at": "2031-05-04T03:02"})
    assert ApiKey.objects.get(name="team").expires_at.isoformat() == "2031-05-04T03:02:00+00:00"


@pytest.mark.parametrize("field, value, message", [
    ("requests_per_minute", "0", "Ensure this value is greater than or equal to 1."),
    ("tokens_per_minute", "-1", "Ensure this value is greater than or equal to 1."),
    ("tokens_per_day", "lots", "A valid integer is required."),
    ("tokens_per_day", "3000000000", "Ensure this value is less than or equal to 2000000000."),
    ("name", "", "This field may not be blank."),
    ("expires_at", "soon", "Datetime has wrong format."),
    ("allowed_models", "q" * 256, "Ensure this field has no more than 255 characters."),
])
def test_a_bad_field_is_refused_next_to_it_and_nothing_is_created(client, field, value, message):
    refused = client.post("/keys/new/", {**NEW_KEY, field: value})
    assert refused.status_code == 400
    assert any(message in m for m in refused.context["errors"][field])
    page = refused.content.decode()
    assert f'<span class="field-error" role="alert" data-field="{field}">{message}' in page
    assert "Please correct the fields marked below." in page
    assert not ApiKey.objects.exists()


def test_edit_changes_limits_and_allowed_models(client, admin_user, models):
    key, raw = ApiKey.issue(admin_user, "team", allowed_models=["chat", "retired"], requests_per_minute=60)
    form = client.get(f"/keys/{key.pk}/edit/").content.decode()
    assert 'name="requests_per_minute" type="number" min="1" value="60"' in form
    assert 'value="retired" checked> retired <span class="muted small">(not deployed)</span>' in form
    assert 'value="embed" >' in form  # not ticked
    refused = client.post(f"/keys/{key.pk}/edit/", {"allowed_models": ["embed"], "requests_per_minute": "0"})
    assert refused.status_code == 400 and refused.context["errors"]["requests_per_minute"] == [
        "Ensure this value is greater than or equal to 1."]
    saved = client.post(f"/keys/{key.pk}/edit/", {"allowed_models": ["embed"], "requests_per_minute": "",
                                                  "tokens_per_minute": "5000", "tokens_per_day": ""})
    assert saved.status_code == 302 and saved["Location"] == "/keys/"
    key.refresh_from_db()
    assert (key.allowed_models, key.requests_per_minute, key.tokens_per_minute, key.tokens_per_day) == \
        (["embed"], None, 5000, None)
    assert ApiKey.find(raw) == key  # the same secret
    assert client.post(f"/keys/{key.pk}/edit/", {"requests_per_minute": "9"}).status_code == 302
    key.refresh_from_db()
    assert key.allowed_models == [] and key.requests_per_minute == 9  # none ticked: every model


def test_revoke_stops_the_key(client, admin_user):
    key, raw = ApiKey.issue(admin_user, "team", scope="inference")
    page = client.get("/keys/").content.decode()
    assert f'action="/keys/{key.pk}/revoke/" data-confirm="Revoke team?' in page
    revoked = client.post(f"/keys/{key.pk}/revoke/", follow=True)
    assert "API key team revoked." in revoked.content.decode()
    key.refresh_from_db()
    assert key.revoked_at is not None and ApiKey.find(raw) is None
    assert Client(HTTP_AUTHORIZATION=f"Bearer {raw}").get("/v1/models").status_code == 401


@pytest.mark.parametrize("path, method", [("/keys/", "get"), ("/keys/new/", "get"), ("/keys/new/", "post"),
                                          ("/keys/{pk}/edit/", "post"), ("/keys/{pk}/revoke/", "post")])
def test_only_an_admin_gets_in(admin_user, path, method):
    key, raw = ApiKey.issue(admin_user, "team", requests_per_minute=5)
    path = path.format(pk=key.pk)
    User = get_user_model()
    plain = Client()
    plain.force_login(User.objects.create_user("plain", password="pw"))
    clerk = Client()  # staff without the key permissions
    clerk.force_login(User.objects.create_user("clerk", password="pw", is_staff=True))
    anonymous = getattr(Client(), method)(path, {**NEW_KEY, "requests_per_minute": "1"})
    assert anonymous.status_code == 302 and anonymous["Location"].startswith("/login/")
    for client in (plain, clerk, Client(HTTP_AUTHORIZATION=f"Bearer {raw}")):
        answer = getattr(client, method)(path, {**NEW_KEY, "requests_per_minute": "1"})
        assert answer.status_code in (302, 403), (path, answer.status_code)
        if answer.status_code == 302:
            assert answer["Location"].startswith("/login/")
    key.refresh_from_db()
    assert key.revoked_at is None and key.requests_per_minute == 5 and ApiKey.objects.count() == 1


def test_the_page_in_chinese(client, admin_user, models):
    ApiKey.issue(admin_user, "team", requests_per_minute=60)
    page = client.get("/keys/", HTTP_ACCEPT_LANGUAGE="zh-hans").content.decode()
    for words in ("API 密钥", "新建密钥", "前缀", "范围", "最近使用", "到期", "允许的模型", "今日用量", "60 请求/分钟",
                  "所有模型", "吊销", "有效", "0 次请求 · 0 个 token"):
        assert words in page, words
    form = client.get("/keys/new/", HTTP_ACCEPT_LANGUAGE="zh-hans").content.decode()
    for words in ("新建密钥", "仅网关 (/v1)", "每分钟请求数", "每天 token 数（UTC）", "创建密钥"):
        assert words in form, words
    refused = client.post("/keys/new/", {**NEW_KEY, "requests_per_minute": "0"}, HTTP_ACCEPT_LANGUAGE="zh-hans")
    assert "请更正下面标出的字段。" in refused.content.decode()
    created = client.post("/keys/new/", NEW_KEY, HTTP_ACCEPT_LANGUAGE="zh-hans").content.decode()
    assert "请立即复制：之后不会再显示。" in created
