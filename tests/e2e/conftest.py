
import pytest

from tests.e2e.system import fresh_cache, start_system
from tests.fixtures.hubs import start_huggingface, start_modelscope
from tests.fixtures.tiny_gguf import write_tiny_llama


def pytest_collection_modifyitems(items):
    for item in items:
        if "/e2e/" in str(item.fspath):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {
        "chat": write_tiny_llama(root / "tiny-chat.gguf"),
        "embed": write_tiny_llama(root / "tiny-embed.gguf", embedding=True, seed=1, name="tiny-embed"),
    }


@pytest.fixture(scope="session")
def hubs():
    """Stand-in Hugging Face and ModelScope hubs the system's clients talk to (HF_ENDPOINT, MODELSCOPE_ENDPOINT)."""
    started = {"huggingface": start_huggingface(), "modelscope": start_modelscope()}
    yield started
    for hub in started.values():
        hub.stop()


@pytest.fixture
def deploy(system, tiny_models):
    """POST the tiny chat model under a name (with `fields` on top); the models it made are deleted afterwards.
    `expect` is the status the API must answer; the answer's JSON is returned."""
    created = []

    def deploy(name, replicas=1, expect=201, **fields):
        with system.client() as c:
            response = c.post("/api/v1/models", json={"name": name, "source": "local_path", "replicas": replicas,
                                                      "local_path": str(tiny_models["chat"]),
                                                      "backend_parameters": ["--ctx-size", "256"], **fields})
        assert response.status_code == expect, response.text
        if response.status_code == 201:
            created.append(response.json()["id"])
        return response.json()

    yield deploy
    with system.client() as c:
        for model_id in created:
            c.delete(f"/api/v1/models/{model_id}")


METRICS_TOKEN = "e2e-metrics-token"


@pytest.fixture(scope="session")
def system(tmp_path_factory, hubs):
    """One running aiMindServe shared by the end-to-end tests (starting one costs seconds)."""
    tmp = tmp_path_factory.mktemp("system")
    running = start_system(tmp, extra_env={
        "AIMIND_CACHE_DIR": str(fresh_cache(tmp)), "HF_ENDPOINT": hubs["huggingface"].url,
        "MODELSCOPE_ENDPOINT": hubs["modelscope"].url, "HF_HOME": str(tmp / "hf-home"),
        "MODELSCOPE_CACHE": str(tmp / "modelscope-cache"), "HF_TOKEN": "", "AIMIND_METRICS_TOKEN": METRICS_TOKEN,
        "AIMIND_SLEEP_CHECK_INTERVAL": "3"})  # idle models are looked for every 3 s, not every 15
    yield running
    running.stop()


@pytest.fixture
def inference_key(system):
    with system.client() as c:
        issued = c.post("/api/v1/keys", json={"name": "e2e inference", "scope": "inference"}).json()
    return issued
