"""Workers chosen by labels (also edited later through the API) or GPUs picked by hand."""

import pytest

from models_app.models import ModelInstance
from scheduler_app.scheduler import pending_instance_ids, schedule_instances

pytestmark = pytest.mark.django_db


def test_label_selector_chooses_matching_workers_only(register, deploy, llama_8b):
    register("a", vram_gib=[24], labels={"gpu": "rtx"})
    register("b", vram_gib=[24], labels={"gpu": "h100"})
    instances = deploy(llama_8b, replicas=2, worker_selector={"gpu": "h100"})
    assert {i.worker.name for i in instances} == {"b"}


def test_label_edited_through_the_api_lets_a_pending_instance_in(api, register, deploy, llama_8b):
    worker = register("a", vram_gib=[24], labels={"zone": "x"})
    [instance] = deploy(llama_8b, worker_selector={"zone": "y"})
    assert instance.state == "pending"
    assert "a: labels do not match zone=y" in instance.state_message
    assert api.patch(f"/api/v1/workers/{worker['id']}", {"labels": {"zone": "y"}}, format="json").status_code == 200
    schedule_instances(pending_instance_ids())
    instance.refresh_from_db()
    assert instance.state == "scheduled" and instance.worker.name == "a"


def test_manual_single_gpu(register, deploy, llama_8b):
    register("a", vram_gib=[24, 24])
    register("b", vram_gib=[24, 24])
    [instance] = deploy(llama_8b, gpu_selector={"gpu_ids": ["b:1"]})
    assert (instance.worker.name, instance.gpu_indexes) == ("b", [1])
    assert list(instance.computed_resource_claim["vram"]) == ["1"]


def test_manual_multi_gpu_splits_the_model_over_exactly_those_gpus(register, deploy, llama_8b):
    register("a", vram_gib=[24, 24, 24, 24])
    [instance] = deploy(llama_8b, gpu_selector={"gpu_ids": ["a:1", "a:3"]})
    claim = instance.computed_resource_claim
    assert instance.gpu_indexes == [1, 3]
    assert set(claim["vram"]) == {"1", "3"}
    assert claim["offload_layers"] == claim["total_layers"] == 33
    assert len(claim["tensor_split"]) == 2


def test_manual_gpu_too_small_stays_pending_with_the_reason(register, deploy, llama_70b):
    register("a", vram_gib=[24, 24])
    [instance] = deploy(llama_70b, gpu_selector={"gpu_ids": ["a:0"]}, cpu_offloading=False)
    assert instance.state == "pending"
    assert "a: needs" in instance.state_message and "VRAM on 1 GPU, largest free is 24.0 GiB" in instance.state_message
    assert ModelInstance.objects.get().worker is None


def test_manual_gpu_on_unknown_worker_is_explained(register, deploy, llama_8b):
    register("a", vram_gib=[24])
    [instance] = deploy(llama_8b, gpu_selector={"gpu_ids": ["ghost:0"]})
    assert instance.state == "pending"
    assert "ghost: no such worker (gpu_selector)" in instance.state_message
