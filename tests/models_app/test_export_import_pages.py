"""Export and Import on the Models page: the same YAML as `manage.py export_models`, and the same import (created or
updated by name, all or nothing) from an uploaded file, for admins only, with what changed or why nothing did."""

import io

import pytest
import yaml
from django.contrib.auth import get_user_model
from django.core.files.uploadedfile import SimpleUploadedFile
from django.core.management import call_command
from django.test import Client

from models_app import actions
from models_app.models import Model
from models_app.portable import FIELDS

pytestmark = pytest.mark.django_db


@pytest.fixture
def client(admin_user):
    client = Client(enforce_csrf_checks=True)
    client.force_login(admin_user)
    return client


def settings_of(name: str) -> dict:
    model = Model.objects.get(name=name)
    return {field: getattr(model, field) for field in FIELDS}


def upload(client, text: str, name: str = "models.yaml", language: str = "en"):
    """Submit the Import form as a browser does: the page's CSRF token, then the file."""
    page = client.get("/", HTTP_ACCEPT_LANGUAGE=language)
    token = page.context["csrf_token"]
    file = SimpleUploadedFile(name, text.encode(), content_type="application/yaml")
    return client.post("/models/import/", {"file": file, "csrfmiddlewaretoken": str(token)},
                       HTTP_ACCEPT_LANGUAGE=language, follow=True)


@pytest.fixture
def models():
    actions.do_create_model(name="chat", source="huggingface", huggingface_repo_id="acme/tiny-GGUF",
                            huggingface_filename="*Q4_K_M*.gguf", replicas=0, env={"OMP_NUM_THREADS": "2"})
    actions.do_create_model(name="embed", source="local_path", local_path="/models/e.gguf", replicas=0,
                            backend_parameters=["--pooling", "mean"])


def test_the_page_offers_export_and_import_and_export_downloads_what_the_command_prints(client, models):
    page = client.get("/").content.decode()
    assert 'href="/models/export/"' in page and 'action="/models/import/"' in page
    assert 'enctype="multipart/form-data"' in page and 'name="csrfmiddlewaretoken"' in page
    zh = client.get("/", HTTP_ACCEPT_LANGUAGE="zh-hans").content.decode()
    assert ">导出</a>" in zh and ">导入</summary>" in zh
    exported = client.get("/models/export/")
    assert exported["Content-Disposition"] == 'attachment; filename="models.yaml"'
    assert exported["Content-Type"].startswith("application/yaml")
    printed = io.StringIO()
    call_command("export_models", stdout=printed)
    assert exported.content.decode() == printed.getvalue()


def test_import_creates_and_updates_by_name_and_says_which(client, models):
    document = yaml.safe_load(client.get("/models/export/").content.decode())
    [chat] = [m for m in document["models"] if m["name"] == "chat"]
    chat["backend_parameters"] = ["--ctx-size", "1024"]
    document["models"].append({**chat, "name": "chat-copy", "replicas": 0})
    done = upload(client, yaml.safe_dump(document, allow_unicode=True))
    assert done.redirect_chain == [("/", 302)]
    text = done.content.decode()
    assert ("Imported models.yaml: created 1 (chat-copy), updated 1 (chat), unchanged 1 (embed).") in text
    assert settings_of("chat")["backend_parameters"] == ["--ctx-size", "1024"]
    assert {**settings_of("chat-copy"), "name": "chat"} == settings_of("chat")
    again = upload(client, yaml.safe_dump(document, allow_unicode=True)).content.decode()
    assert "created 0, updated 0, unchanged 3 (chat, embed, chat-copy)." in again  # in the file's order


@pytest.mark.parametrize("text, says", [
    ("models:\n- name: fresh\n  source: huggingface\n  huggingface_repo_id: a/b\n  huggingface_filename: x.gguf\n"
     "- name: chat\n  source: huggingface\n  huggingface_repo_id: a/b\n  replicas: -3\n",
     "model chat: replicas: "),
    ("models: [", "not YAML"),
])
def test_a_refused_file_shows_why_and_changes_nothing(client, models, text, says):
    before = {name: settings_of(name) for name in ("chat", "embed")}
    refused = upload(client, text)
    assert refused.status_code == 400 and refused.redirect_chain == []
    page = refused.content.decode()
    assert "Import refused, nothing was changed: " in page and says in page
    assert sorted(Model.objects.values_list("name", flat=True)) == ["chat", "embed"]  # not even `fresh`
    assert {name: settings_of(name) for name in ("chat", "embed")} == before
    zh = upload(client, text, language="zh-hans").content.decode()
    assert "导入被拒绝，未做任何更改：" in zh


def test_only_admins_who_may_change_models_import_and_csrf_is_checked(models):
    clerk = get_user_model().objects.create_user("clerk", password="pw", is_staff=True)
    staff = Client()
    staff.force_login(clerk)
    assert staff.get("/models/export/").status_code == 403
    file = SimpleUploadedFile("models.yaml", b"models: []\n")
    assert staff.post("/models/import/", {"file": file}).status_code == 403
    assert Client().post("/models/import/", {"file": file})["Location"] == "/login/?next=/models/import/"
    admin = get_user_model().objects.create_superuser("root", password="pw")
    forged = Client(enforce_csrf_checks=True)
    forged.force_login(admin)
    assert forged.post("/models/import/", {"file": SimpleUploadedFile("m.yaml", b"models: []\n")}).status_code == 403
