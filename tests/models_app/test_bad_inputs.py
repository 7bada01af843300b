"""Bad input is answered with a 4xx naming the field, never a 500, a hang or a giant table: bounds on every number
and list, deep JSON, control characters, paths with .., env names, shell text kept as one argument."""

import json

import pytest
from django.test import override_settings

from models_app.models import Model, ModelInstance
from tests.factories import make_worker
from workers_app.backends.base import Installation, LaunchSpec
from workers_app.backends.llama_box import LlamaBox

pytestmark = pytest.mark.django_db


def post(api, **fields):
    body = {"name": "m", "source": "local_path", "local_path": "/m.gguf", **fields}
    return api.post("/api/v1/models", body, format="json")


@pytest.mark.parametrize(("fields", "field"), [
    ({"replicas": 10**9}, "replicas"), ({"replicas": 2**63}, "replicas"), ({"replicas": -1}, "replicas"),
    ({"name": "n" * 10000}, "name"), ({"name": "bad\x00name"}, "name"), ({"name": "line\nbreak"}, "name"),
    ({"description": "d" * (3 << 20)}, "description"), ({"local_path": "/models/../etc/passwd.gguf"}, "local_path"),
    ({"backend_parameters": ["--ctx-size", "-5"]}, "backend_parameters"),
    ({"backend_parameters": ["--x"] * 300}, "backend_parameters"),
    ({"env": {"A=B": "x"}}, "env"), ({"env": {"": "x"}}, "env"), ({"env": {"X": "nul\x00byte"}}, "env"),
    ({"env": {f"V{n}": "x" for n in range(300)}}, "env"), ({"worker_selector": {"": "x"}}, "worker_selector"),
    ({"gpu_selector": {"gpu_ids": ["w:99999"]}}, "gpu_selector"), ({"gpu_selector": {"gpu_ids": ["w:²"]}},
                                                                    "gpu_selector"),
    ({"backend_version": "../../x"}, "backend_version"), ({"categories": ["llm"] * 50}, "categories"),
])
def test_bad_fields_are_refused_naming_them(api, fields, field):
    response = post(api, **fields)
    assert response.status_code == 400, response.content[:300]
    assert field in response.json()
    assert not Model.objects.exists()


@override_settings(MAX_INSTANCES=5)
def test_the_clusters_instance_cap_counts_every_model(api):
    assert post(api, name="a", replicas=4).status_code == 201
    refused = post(api, name="b", replicas=2)
    assert refused.status_code == 400
    assert "the cluster allows 5 instances in all (AIMIND_MAX_INSTANCES); other models have 4, so at most 1 here" \
        in refused.json()["replicas"][0]
    assert ModelInstance.objects.count() == 4


def test_deeply_nested_json_is_a_400(api):
    deep = "[" * 100_000 + "]" * 100_000
    response = api.generic("POST", "/api/v1/models", deep, content_type="application/json")
    assert response.status_code == 400 and "nested too deeply" in response.json()["detail"]


HUGE_ID = "9" * 25  # past the largest id a row can have


@pytest.mark.parametrize("path", [f"/api/v1/instances/{HUGE_ID}", f"/api/v1/instances/{HUGE_ID}/events",
                                  f"/api/v1/models/{HUGE_ID}"])
def test_an_id_past_any_rows_is_a_404(api, path):
    assert api.get(path).status_code == 404


def test_an_instance_page_past_any_rows_is_a_404(admin_client):
    assert admin_client.get(f"/instances/{HUGE_ID}/").status_code == 404


def test_a_model_id_past_any_rows_is_refused_naming_it(api):
    response = api.get(f"/api/v1/instances/deleted?model={HUGE_ID}")
    assert response.status_code == 400 and "model" in response.json()


def test_lists_are_bounded_and_say_how_many_there_are(api):
    make_worker("w")
    for n in range(3):
        post(api, name=f"m{n}", replicas=0)
    page = api.get("/api/v1/models?limit=2")
    assert len(page.json()) == 2 and page["X-Total-Count"] == "3" and 'rel="next"' in page["Link"]
    assert len(api.get("/api/v1/models?limit=100000").json()) == 3  # capped at 1000, not refused


def test_shell_text_in_a_parameter_reaches_the_backend_as_one_argument(tmp_path):
    server = tmp_path / "llama-server"
    server.write_text("#!/bin/sh\necho usage\n")
    server.chmod(0o755)
    spec = LaunchSpec(model_name="m", model_path=tmp_path / "m.gguf", host="127.0.0.1", port=1, categories=[],
                      gpu_indexes=[], claim={}, installation=Installation("llama-box", "x", "cpu", tmp_path, server),
                      backend_parameters=["--system-prompt", "$(touch /tmp/pwned); `id` | rm -rf / && echo"])
    cmd = LlamaBox().command(spec)
    assert cmd[-1] == "$(touch /tmp/pwned); `id` | rm -rf / && echo"  # one argv item, and no shell ever runs


def test_worker_registration_numbers_and_names_are_bounded():
    from rest_framework.test import APIClient

    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION="Bearer test-cluster-token")
    for body in ({"name": "bad name;rm"}, {"name": "w", "status": {"memory": {"total": 2**70}}},
                 {"name": "w", "labels": {f"k{n}": "v" for n in range(100)}},
                 {"name": "w", "status": {"gpus": [{"index": 5000, "memory": {"total": 1}}]}}):
        response = client.post("/api/v1/workers", json.dumps(body), content_type="application/json")
        assert response.status_code == 400, (body, response.content)
