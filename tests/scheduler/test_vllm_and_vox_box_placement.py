"""Hugging Face-format models go to vLLM on GPUs (its memory share is the claim); speech models to vox-box."""

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


def test_vllm_never_falls_back_to_cpu(tmp_path, register, deploy):
    register("cpu", ram_gib=512)
    [instance] = deploy(hf_dir(tmp_path, "m", 15))
    assert instance.state == "pending"
    assert "cpu: has no GPU; vLLM runs on GPUs only" in instance.state_message


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
    assert gib(0.6) < instance.computed_resource_claim["ram"] < gib(1.0)
