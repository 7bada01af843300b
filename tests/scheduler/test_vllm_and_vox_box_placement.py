"""Hugging Face-format models go to vLLM: on GPUs its memory share is the claim, on CPU-only workers RAM for the
runtime, weights and KV cache; speech models go to vox-box; a worker that cannot run the backend is skipped."""

import json
import os

import pytest

from tests.scheduler.conftest import gib

pytestmark = pytest.mark.django_db


def hf_dir(root, name: str, weight_gib: float, *, heads: int = 32, architectures=("LlamaForCausalLM",)):
    path = root / name
    path.mkdir()
    (path / "config.json").write_text(json.dumps({
        "architectures": list(architectures), "model_type": "llama", "hidden_size": heads * 128,
        "num_attention_heads": heads, "num_key_value_heads": 8, "num_hidden_layers": 32,
        "max_position_embeddings": 131072, "torch_dtype": "bfloat16"}))
    weights = path / "model.safetensors"
    weights.touch()
    os.truncate(weights, gib(weight_gib))  # sparse: the size is what matters
    return path


def test_hf_model_goes_to_vllm_and_claims_its_memory_share(tmp_path, register, deploy):
    register("g", vram_gib=[24, 24])
    [instance] = deploy(hf_dir(tmp_path, "llama-8b", 15))
    instance.model.refresh_from_db()
    assert instance.model.backend == "vllm" and instance.model.categories == ["llm"]
    assert instance.gpu_indexes in ([0], [1])
    vram = instance.computed_resource_claim["vram"]
    assert int(next(iter(vram.values()))) == int(0.9 * gib(24))


def test_vllm_second_replica_needs_another_gpu(tmp_path, register, deploy):
    register("g", vram_gib=[24, 24])
    instances = deploy(hf_dir(tmp_path, "llama-8b", 15), replicas=3)
    assert sorted(i.gpu_indexes[0] for i in instances if i.state == "scheduled") == [0, 1]
    [waiting] = [i for i in instances if i.state == "pending"]
    assert "within 0.9 of each GPU" in waiting.state_message


def test_vllm_tensor_parallel_uses_the_fewest_gpus(tmp_path, register, deploy):
    register("g", vram_gib=[24, 24, 24, 24])
    [instance] = deploy(hf_dir(tmp_path, "big", 38))
    assert len(instance.gpu_indexes) == 2


def test_vllm_gpu_memory_utilization_parameter_is_the_claim(tmp_path, register, deploy):
    register("g", vram_gib=[80])
    [instance] = deploy(hf_dir(tmp_path, "m", 15), backend_parameters=["--gpu-memory-utilization=0.5"])
    assert int(instance.computed_resource_claim["vram"]["0"]) == gib(40)


def test_vllm_runs_on_a_cpu_only_worker_claiming_ram(tmp_path, register, deploy):
    register("cpu", ram_gib=64)
    [instance] = deploy(hf_dir(tmp_path, "m", 15))
    claim = instance.computed_resource_claim
    assert instance.state == "scheduled" and instance.gpu_indexes == [] and claim["vram"] == {}
    assert claim["max_model_len"] == 8192
    kv = 2 * 32 * 8 * 128 * 2 * 8192 * 2  # K and V, layers, kv heads, head dim, bf16, tokens, two sequences
    assert claim["kv_cache_bytes"] == kv
    assert claim["ram"] == gib(2.5) + gib(15) + kv


def test_vllm_on_cpu_says_how_much_ram_it_lacks(tmp_path, register, deploy):
    register("small", ram_gib=8)
    [instance] = deploy(hf_dir(tmp_path, "m", 15))
    assert instance.state == "pending"
    assert "small: needs 19.5 GiB RAM for vLLM on CPU, has 8.0 GiB free" in instance.state_message


def test_vllm_on_a_gpu_worker_never_falls_back_to_its_cpu(tmp_path, register, deploy):
    register("g", vram_gib=[8], ram_gib=512)
    [instance] = deploy(hf_dir(tmp_path, "m", 15))
    assert instance.state == "pending"
    assert "g: needs" in instance.state_message and "VRAM on 1 GPU" in instance.state_message


def test_worker_that_cannot_install_the_backend_is_skipped_with_its_reason(tmp_path, register, deploy):
    cannot = {"variant": "cpu", "installable": False, "reason": "vLLM has no build for Linux riscv64",
              "installed": []}
    register("riscv", ram_gib=64, backends={"vllm": cannot})
    [instance] = deploy(hf_dir(tmp_path, "m", 1))
    assert instance.state == "pending"
    assert "riscv: cannot run vllm: vLLM has no build for Linux riscv64" in instance.state_message
    register("x86", ram_gib=64, backends={"vllm": {**cannot, "installable": True, "reason": ""}})
    [instance] = deploy(hf_dir(tmp_path, "m2", 1), name="m2")
    assert instance.worker.name == "x86"


def test_a_worker_that_already_has_the_version_may_run_it_without_installing(tmp_path, register, deploy):
    has_it = {"variant": "cpu", "installable": False, "reason": "no compiler", "default_version": "0.32.0",
              "installed": ["0.32.0"]}
    register("offline", ram_gib=64, backends={"vllm": has_it})
    [instance] = deploy(hf_dir(tmp_path, "m", 1))
    assert instance.worker.name == "offline" and instance.backend_version == "0.32.0"
    [other] = deploy(hf_dir(tmp_path, "m2", 1), name="m2", backend_version="0.31.0")
    assert other.state == "pending" and "offline: cannot run vllm: no compiler" in other.state_message


def test_manual_gpus_must_divide_the_attention_heads(tmp_path, register, deploy):
    register("g", vram_gib=[24, 24, 24])
    [instance] = deploy(hf_dir(tmp_path, "m", 30, heads=32), gpu_selector={"gpu_ids": ["g:0", "g:1", "g:2"]})
    assert instance.state == "pending"
    assert "3 GPUs do not divide the model's 32 attention heads" in instance.state_message


def test_whisper_goes_to_vox_box_on_cpu(tmp_path, register, deploy):
    register("cpu", ram_gib=16)
    path = hf_dir(tmp_path, "whisper-base", 0.14, heads=8, architectures=("WhisperForConditionalGeneration",))
    [instance] = deploy(path)
    instance.model.refresh_from_db()
    assert instance.model.backend == "vox-box"
    assert instance.model.categories == ["speech_to_text"]
    assert gib(1.3) < instance.computed_resource_claim["ram"] < gib(1.7)
