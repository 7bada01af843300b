"""Fewest GPUs on one worker, partial offload when allowed, CPU only as the last resort, reasons with numbers."""

import pytest

from models_app.models import ModelInstance

pytestmark = pytest.mark.django_db


def test_70b_takes_the_fewest_gpus_that_hold_it(register, deploy, llama_70b):
    register("four", vram_gib=[24, 24, 24, 24])
    [instance] = deploy(llama_70b, cpu_offloading=False)
    claim = instance.computed_resource_claim
    assert len(instance.gpu_indexes) == 2
    assert claim["offload_layers"] == claim["total_layers"] == 81
    assert all(int(v) <= 24 * 1024**3 for v in claim["vram"].values())


def test_tensor_split_follows_free_vram(register, deploy, llama_70b):
    register("mixed", vram_gib=[36, 18, 18])
    [instance] = deploy(llama_70b, cpu_offloading=False)
    claim = instance.computed_resource_claim
    assert instance.gpu_indexes == [0, 1]
    assert claim["tensor_split"][0] == pytest.approx(2 * claim["tensor_split"][1])
    assert int(claim["vram"]["0"]) > int(claim["vram"]["1"])


def test_partial_offload_puts_the_most_layers_that_fit_on_the_gpu(register, deploy, llama_70b):
    register("small", vram_gib=[24], ram_gib=128)
    [instance] = deploy(llama_70b)
    claim = instance.computed_resource_claim
    assert 20 < claim["offload_layers"] < claim["total_layers"]
    assert int(claim["vram"]["0"]) <= 24 * 1024**3
    assert claim["ram"] > 15 * 1024**3  # the layers that did not fit live in RAM


def test_without_cpu_offloading_nothing_fits_and_the_message_has_numbers(register, deploy, llama_70b):
    register("z-a", vram_gib=[24], ram_gib=128)
    [instance] = deploy(llama_70b, cpu_offloading=False)
    assert instance.state == "pending"
    message = instance.state_message
    assert message.startswith("no worker fits: z-a: needs 4")
    assert "GiB VRAM on 1 GPU, largest free is 24.0 GiB; cpu_offloading is off" in message


def test_cpu_only_worker_runs_the_model_in_ram(register, deploy, llama_8b):
    register("cpu", ram_gib=64)
    [instance] = deploy(llama_8b)
    claim = instance.computed_resource_claim
    assert instance.worker.name == "cpu" and instance.gpu_indexes == []
    assert claim["vram"] == {} and claim["offload_layers"] == 0
    # 4.6 GiB of weights + 1 GiB KV + the CPU repack copy of the Q4_K matrices (~3.6 GiB)
    assert 8 * 1024**3 < claim["ram"] < 11 * 1024**3


def test_gpu_worker_prefers_the_gpu_over_a_cpu_worker(register, deploy, llama_8b):
    register("cpu", ram_gib=256)
    register("gpu", vram_gib=[24], ram_gib=32)
    [instance] = deploy(llama_8b)
    assert instance.worker.name == "gpu" and instance.gpu_indexes == [0]


def test_ram_shortage_is_reported_per_worker(register, deploy, llama_70b):
    register("tiny-a", ram_gib=8)
    register("tiny-b", ram_gib=16)
    [instance] = deploy(llama_70b)
    assert "tiny-a: needs" in instance.state_message and "RAM on CPU, has 8.0 GiB free" in instance.state_message
    assert "tiny-b:" in instance.state_message and "has 16.0 GiB free" in instance.state_message


def test_system_reserved_is_not_allocatable(register, deploy, llama_8b):
    register("reserved", vram_gib=[24], ram_gib=64, system_reserved={"ram": 60 * 1024**3, "vram": 20 * 1024**3})
    [instance] = deploy(llama_8b, cpu_offloading=False)
    assert instance.state == "pending"
    assert "largest free is 4.0 GiB" in instance.state_message


def test_not_ready_worker_is_skipped_with_the_reason(register, deploy, llama_8b):
    from workers_app.models import Worker

    register("down", vram_gib=[24])
    Worker.objects.filter(name="down").update(state="not_ready")
    [instance] = deploy(llama_8b)
    assert instance.state == "pending" and "down: is not ready" in instance.state_message
    assert ModelInstance.objects.filter(state="scheduled").count() == 0


def test_many_workers_with_the_same_story_share_one_line(register, deploy, llama_70b):
    for n in range(6):
        register(f"small-{n}", ram_gib=8)
    [instance] = deploy(llama_70b, distributed_inference_across_workers=False)
    assert "small-0, small-1, small-2 and 3 more: needs" in instance.state_message
    assert len(instance.state_message) < 200


def test_a_requested_prompt_cache_is_part_of_the_claim(register, deploy, llama_8b):
    register("cpu", ram_gib=64)
    [plain] = deploy(llama_8b, name="plain")
    [cached] = deploy(llama_8b, name="cached", backend_parameters=["--cache-ram", "2048"])
    assert cached.computed_resource_claim["ram"] - plain.computed_resource_claim["ram"] == 2048 * 1024**2
