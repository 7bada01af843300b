"""Bad input to POST /api/v1/models gets a 400 naming the field, and creates nothing."""

import pytest

from models_app.models import Model, ModelInstance
from tests.fixtures.tiny_gguf import write_tiny_llama

pytestmark = pytest.mark.django_db


@pytest.fixture
def gguf(tmp_path):
    return write_tiny_llama(tmp_path / "m.gguf")


def post(api, **body):
    return api.post("/api/v1/models", body, format="json")


def test_valid_local_model_is_created_with_its_replicas(api, gguf):
    response = post(api, name="m", source="local_path", local_path=str(gguf), replicas=2)
    assert response.status_code == 201, response.data
    assert response.data["ready_replicas"] == 0
    assert ModelInstance.objects.filter(model__name="m").count() == 2
    assert set(ModelInstance.objects.values_list("state", flat=True)) == {"pending"}


def test_duplicate_name_is_rejected(api, gguf):
    assert post(api, name="m", source="local_path", local_path=str(gguf)).status_code == 201
    response = post(api, name="m", source="local_path", local_path=str(gguf))
    assert response.status_code == 400
    assert "name" in response.data
    assert Model.objects.count() == 1


def test_negative_replicas_are_rejected(api, gguf):
    response = post(api, name="m", source="local_path", local_path=str(gguf), replicas=-1)
    assert response.status_code == 400
    assert "replicas" in response.data
    assert not Model.objects.exists()


def test_unknown_source_is_rejected(api):
    response = post(api, name="m", source="ftp", local_path="/x.gguf")
    assert response.status_code == 400
    assert "source" in response.data


@pytest.mark.parametrize(("source", "field"), [("huggingface", "huggingface_repo_id"),
                                               ("modelscope", "model_scope_model_id"),
                                               ("local_path", "local_path")])
def test_missing_source_field_is_named(api, source, field):
    response = post(api, name="m", source=source)
    assert response.status_code == 400
    assert field in response.data


def test_file_that_is_not_gguf_is_rejected(api, tmp_path):
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"not a model")
    response = post(api, name="m", source="local_path", local_path=str(bogus))
    assert response.status_code == 400
    assert "not a GGUF file" in str(response.data["local_path"])


def test_relative_path_is_rejected(api):
    response = post(api, name="m", source="local_path", local_path="models/m.gguf")
    assert response.status_code == 400
    assert "absolute" in str(response.data["local_path"])


def test_path_the_server_cannot_see_is_accepted_for_the_worker_to_check(api):
    response = post(api, name="m", source="local_path", local_path="/only/on/the/worker/m.gguf")
    assert response.status_code == 201


def test_reserved_backend_flag_is_rejected(api, gguf):
    response = post(api, name="m", source="local_path", local_path=str(gguf), backend_parameters=["--port", "1"])
    assert response.status_code == 400
    assert "--port" in str(response.data["backend_parameters"])


def test_malformed_gpu_selector_is_rejected(api, gguf):
    response = post(api, name="m", source="local_path", local_path=str(gguf), gpu_selector={"gpu_ids": ["w1"]})
    assert response.status_code == 400
    assert "gpu_selector" in response.data


def test_non_integer_context_size_is_rejected(api, gguf):
    response = post(api, name="m", source="local_path", local_path=str(gguf), backend_parameters=["--ctx-size=big"])
    assert response.status_code == 400
    assert "--ctx-size expects an integer" in str(response.data["backend_parameters"])
