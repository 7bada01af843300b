"""Models from a hub are estimated from the hub before anything is downloaded: the 8B's header over range requests
places it like the local file would be placed; a hub that cannot be reached leaves the instance pending (asked
again on the next pass); a repo the hub does not have is an error that names it."""

import pytest

from models_app import actions
from models_app.models import ModelInstance
from scheduler_app import estimate
from scheduler_app.scheduler import schedule_instance
from tests.factories import gpu_status, make_worker
from tests.fixtures.hubs import point_clients_at, start_both, start_huggingface, start_modelscope, stop_all

pytestmark = pytest.mark.django_db
REPO = "acme/Llama-3-8B-GGUF"
FILE = "Meta-Llama-3-8B-Q4_K_M.gguf"


@pytest.fixture(scope="module")
def hubs(llama_8b):
    started = start_both({REPO: {FILE: llama_8b, "README.md": b"# 8B\n"}})
    yield started
    stop_all(started)


@pytest.fixture
def env(hubs, monkeypatch):
    estimate._remote_gguf_info.cache_clear()
    return point_clients_at(hubs, monkeypatch)


def deploy_from(hub: str, repo: str = REPO, pattern: str = "*Q4_K_M*.gguf", name: str = "m") -> ModelInstance:
    fields = ({"huggingface_repo_id": repo, "huggingface_filename": pattern} if hub == "huggingface"
              else {"model_scope_model_id": repo, "model_scope_file_path": pattern})
    model = actions.do_create_model(name=f"{name}-{hub}", source=hub, **fields)
    [instance] = ModelInstance.objects.filter(model=model)
    schedule_instance(instance.pk)
    instance.refresh_from_db()
    return instance


@pytest.mark.parametrize("hub", ["huggingface", "modelscope"])
def test_hub_model_is_placed_from_remote_headers_like_the_local_file(env, hub, llama_8b):
    make_worker("gpu-1", status=gpu_status([24]))
    local = actions.do_create_model(name="local", source="local_path", local_path=str(llama_8b))
    [local_instance] = ModelInstance.objects.filter(model=local)
    schedule_instance(local_instance.pk)
    local_instance.refresh_from_db()
    served = env[hub].bytes_served
    instance = deploy_from(hub)
    assert instance.state == "scheduled", instance.state_message
    assert instance.computed_resource_claim == local_instance.computed_resource_claim
    assert instance.model.categories == ["llm"] and instance.model.backend == "llama-box"
    assert env[hub].bytes_served - served <= 10_000_000  # the header, not the 4.9 GB file


@pytest.mark.parametrize("hub", ["huggingface", "modelscope"])
def test_unreachable_hub_leaves_the_instance_pending(env, hub, monkeypatch):
    make_worker("gpu-1", status=gpu_status([24]))
    dead = start_huggingface() if hub == "huggingface" else start_modelscope()
    dead.stop()
    monkeypatch.setenv("HF_ENDPOINT" if hub == "huggingface" else "MODELSCOPE_ENDPOINT", dead.url)
    instance = deploy_from(hub)
    assert instance.state == "pending"
    assert "unreachable" in instance.state_message and "asking again" in instance.state_message


@pytest.mark.parametrize("hub", ["huggingface", "modelscope"])
def test_missing_repo_or_file_is_an_error_naming_it(env, hub):
    make_worker("gpu-1", status=gpu_status([24]))
    instance = deploy_from(hub, repo="acme/nothing-here")
    assert instance.state == "error" and "nothing-here" in instance.state_message
    assert instance.worker is None
    missing = deploy_from(hub, pattern="*IQ2_XS*.gguf", name="other")
    assert missing.state == "error" and "*IQ2_XS*.gguf" in missing.state_message
