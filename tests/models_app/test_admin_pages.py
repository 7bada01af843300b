"""The admin and the pages render for an operator, with data in them; the admin judges a model as the API does."""

import pytest
from django.test import Client

from models_app import actions
from models_app.models import ModelInstance
from tests.factories import gpu_status, make_worker

pytestmark = pytest.mark.django_db


@pytest.fixture
def browser(admin_user):
    client = Client()
    client.force_login(admin_user)
    make_worker("gpu-1", status=gpu_status([24]), labels={"zone": "a"})
    model = actions.do_create_model(name="tiny", source="local_path", local_path="/m.gguf")
    ModelInstance.objects.filter(model=model).update(state="error", state_message="backend exited with code 1")
    return client


@pytest.mark.parametrize("path", ["/admin/", "/admin/models_app/model/", "/admin/models_app/model/add/",
                                  "/admin/models_app/modelinstance/", "/admin/workers_app/worker/",
                                  "/admin/gateway_app/apikey/", "/admin/gateway_app/apikey/add/", "/"])
def test_operator_pages_render(browser, path):
    response = browser.get(path)
    assert response.status_code == 200, path


def test_instance_page_shows_state_and_live_log_panel(browser):
    instance = ModelInstance.objects.get()
    page = browser.get(f"/admin/models_app/modelinstance/{instance.pk}/change/").content.decode()
    assert "backend exited with code 1" in page
    assert f"/ws/instances/{instance.pk}/logs" in page


def test_models_page_lists_models_and_their_instances(browser):
    page = browser.get("/").content.decode()
    assert "tiny" in page and "Error" in page and "backend exited with code 1" in page
    assert "gpu-1" in browser.get("/resources/").content.decode()


def test_instance_lists_show_download_progress(browser):
    ModelInstance.objects.update(state="downloading", download_progress=42.4, state_message="downloading")
    for path in ("/admin/models_app/modelinstance/", "/"):
        assert "Downloading 42%" in browser.get(path).content.decode(), path


def test_pages_need_a_login():
    assert Client().get("/").status_code == 302


def admin_model_form(**overrides) -> dict:
    return {"name": "from-admin", "description": "", "replicas": "2", "categories": "[]", "source": "local_path",
            "local_path": "/m.gguf", "placement_strategy": "spread", "worker_selector": "{}", "gpu_selector": "null",
            "backend": "", "backend_version": "", "backend_parameters": "[]", "env": "{}", "cpu_offloading": "on",
            "restart_on_error": "on", "instances-TOTAL_FORMS": "0", "instances-INITIAL_FORMS": "0", **overrides}


def test_admin_refuses_what_the_api_refuses_with_the_same_message(browser):
    for bad, message in (({"backend_parameters": '["--port", "8080"]'},
                           "--port is set by aiMindServe and cannot be overridden"),
                          ({"worker_selector": '["not", "a", "dict"]'}, "Expected a dictionary of items")):
        response = browser.post("/admin/models_app/model/add/", admin_model_form(**bad))
        assert response.status_code == 200 and message in response.content.decode()
    assert not ModelInstance.objects.filter(model__name="from-admin").exists()


def test_an_admin_edit_marks_running_instances_outdated(browser):
    model = actions.do_create_model(name="edited", source="local_path", local_path="/m.gguf")
    response = browser.post(f"/admin/models_app/model/{model.pk}/change/", admin_model_form(
        name="edited", replicas="1", backend_parameters='["--ctx-size", "1024"]'))
    assert response.status_code == 302, response.content.decode()[:3000]
    model.refresh_from_db()
    assert model.config_version == 2
    assert all(i.outdated for i in ModelInstance.objects.filter(model=model).select_related("model"))


def test_admin_creates_a_model_through_the_actions(browser, tmp_path):
    response = browser.post("/admin/models_app/model/add/", {
        "name": "from-admin", "description": "", "replicas": "2", "categories": "[]", "source": "local_path",
        "local_path": "/m.gguf", "placement_strategy": "spread", "worker_selector": "{}", "gpu_selector": "null",
        "backend": "", "backend_version": "", "backend_parameters": "[]", "env": "{}", "cpu_offloading": "on",
        "restart_on_error": "on", "instances-TOTAL_FORMS": "0", "instances-INITIAL_FORMS": "0",
    })
    assert response.status_code == 302, response.content.decode()[:2000]
    assert ModelInstance.objects.filter(model__name="from-admin").count() == 2
