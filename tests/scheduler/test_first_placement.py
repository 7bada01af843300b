"""The scheduler places an instance on a worker that fits, or leaves it pending and says why, with numbers."""

import pytest

from models_app import actions
from models_app.models import ModelInstance
from scheduler_app.scheduler import schedule_instance
from tests.factories import cpu_status, gpu_status, make_worker
from tests.fixtures.tiny_gguf import write_tiny_llama

pytestmark = pytest.mark.django_db


@pytest.fixture
def gguf(tmp_path):
    return write_tiny_llama(tmp_path / "m.gguf")


def deploy(path, **fields):
    model = actions.do_create_model(name=fields.pop("name", "m"), source="local_path", local_path=str(path), **fields)
    return list(ModelInstance.objects.filter(model=model))


def test_cpu_worker_gets_the_instance_with_a_ram_claim(gguf):
    make_worker("cpu-1", status=cpu_status(16))
    [instance] = deploy(gguf)
    assert schedule_instance(instance.pk) == "scheduled"
    instance.refresh_from_db()
    assert instance.worker.name == "cpu-1"
    assert instance.gpu_indexes == []
    assert instance.computed_resource_claim["ram"] > 0
    assert instance.computed_resource_claim["vram"] == {}
    assert instance.model.categories == ["llm"]


def test_gpu_worker_gets_full_offload_on_one_gpu(gguf):
    make_worker("gpu-1", status=gpu_status([24]))
    [instance] = deploy(gguf)
    schedule_instance(instance.pk)
    instance.refresh_from_db()
    claim = instance.computed_resource_claim
    assert instance.gpu_indexes == [0]
    assert claim["offload_layers"] == claim["total_layers"] == 3
    assert int(claim["vram"]["0"]) > 0


def test_embedding_model_is_detected(tmp_path):
    make_worker("cpu-1")
    [instance] = deploy(write_tiny_llama(tmp_path / "e.gguf", embedding=True), name="e")
    schedule_instance(instance.pk)
    instance.refresh_from_db()
    assert instance.model.categories == ["embedding"]


def test_nothing_fits_stays_pending_with_numbers(gguf):
    make_worker("tiny", status=cpu_status(0.001))
    [instance] = deploy(gguf)
    assert schedule_instance(instance.pk) == "pending"
    instance.refresh_from_db()
    assert instance.worker is None
    assert "tiny: needs" in instance.state_message and "GiB RAM" in instance.state_message


def test_no_workers_says_so(gguf):
    [instance] = deploy(gguf)
    schedule_instance(instance.pk)
    instance.refresh_from_db()
    assert instance.state == "pending"
    assert instance.state_message == "no workers have registered yet"


def test_label_selector_picks_the_matching_worker(gguf):
    make_worker("a", labels={"zone": "a"})
    make_worker("b", labels={"zone": "b"})
    [instance] = deploy(gguf, worker_selector={"zone": "b"})
    schedule_instance(instance.pk)
    instance.refresh_from_db()
    assert instance.worker.name == "b"


def test_spread_puts_replicas_on_different_workers(gguf):
    make_worker("a")
    make_worker("b")
    instances = deploy(gguf, replicas=2)
    for instance in instances:
        schedule_instance(instance.pk)
    assert set(ModelInstance.objects.values_list("worker__name", flat=True)) == {"a", "b"}


def test_binpack_fills_one_worker_first(gguf):
    make_worker("a")
    make_worker("b")
    instances = deploy(gguf, replicas=2, placement_strategy="binpack")
    for instance in instances:
        schedule_instance(instance.pk)
    assert len(set(ModelInstance.objects.values_list("worker__name", flat=True))) == 1


def test_unreadable_local_path_is_placed_with_an_unknown_claim():
    make_worker("a")
    [instance] = deploy("/only/on/worker/m.gguf")
    schedule_instance(instance.pk)
    instance.refresh_from_db()
    assert instance.state == "scheduled"
    assert instance.computed_resource_claim["ram"] == 0 and instance.computed_resource_claim["unknown"] is True
    assert "cannot read" in instance.state_message


def test_unreadable_local_path_on_a_gpu_worker_gets_a_gpu_and_an_unknown_claim_for_the_worker():
    make_worker("g", status=gpu_status([24]))
    [instance] = deploy("/only/on/worker/m.gguf")
    schedule_instance(instance.pk)
    instance.refresh_from_db()
    claim = instance.computed_resource_claim
    assert instance.gpu_indexes == [0] and claim["unknown"] is True and claim["ctx_size"] is None
    assert (instance.backend, instance.backend_version) == ("llama-box", "0.3.36")


def test_evaluation_answers_without_deploying(api, gguf):
    make_worker("a", status=cpu_status(16))
    response = api.post("/api/v1/evaluations", {"model_specs": [
        {"name": "x", "source": "local_path", "local_path": str(gguf)},
        {"name": "y", "source": "local_path", "local_path": str(gguf), "worker_selector": {"gpu": "h100"}},
    ]}, format="json")
    assert response.status_code == 200, response.data
    fits, misses = response.data["results"]
    assert fits["compatible"] and fits["placement"]["worker_name"] == "a"
    assert fits["placement"]["computed_resource_claim"]["ram"] > 0
    assert not misses["compatible"] and "labels do not match gpu=h100" in misses["message"]
    assert not ModelInstance.objects.exists()
