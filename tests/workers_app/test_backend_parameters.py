"""Backend parameters as each backend reads them: the flags that change an estimate, and the API's refusals."""

import pytest

from workers_app.backends import get_backend
from workers_app.backends.llama_box import BackendParameterError, parse_backend_parameters
from workers_app.backends.vllm import parse_vllm_parameters


def test_parse_backend_parameters():
    params = ["--ctx-size=4096", "-ngl", "20", "--tensor-split", "3,1", "-ctk", "Q8_0", "--cache-type-v=q4_0",
              "--parallel", "2", "--jinja", "--temp", "0.5", "-fa", "on"]
    assert parse_backend_parameters(params) == {"ctx_size": 4096, "n_gpu_layers": 20, "tensor_split": [3.0, 1.0],
                                                "cache_type_k": "q8_0", "cache_type_v": "q4_0", "parallel": 2}
    assert parse_backend_parameters(["-c 4096"]) == {}  # one item with a space is not a flag llama-server knows
    assert parse_backend_parameters(["-c", "4096", "-np=8", "-ctv", "f16"]) == {"ctx_size": 4096, "parallel": 8,
                                                                               "cache_type_v": "f16"}
    assert parse_backend_parameters(["--n-gpu-layers=0", "-ts", "1/1/2"]) == {"n_gpu_layers": 0,
                                                                             "tensor_split": [1.0, 1.0, 2.0]}
    assert parse_backend_parameters([]) == {}
    with pytest.raises(BackendParameterError, match="needs a value"):
        parse_backend_parameters(["--ctx-size"])
    with pytest.raises(BackendParameterError, match="integer"):
        parse_backend_parameters(["-c", "big"])


def test_vllm_parameters_read_sizes_as_vllm_does():
    assert parse_vllm_parameters(["--max-model-len", "8k", "--kv-cache-memory-bytes=64M", "-tp", "2",
                                  "--gpu-memory-utilization=0.5", "--enforce-eager"]) == {
        "max_model_len": 8000, "kv_cache_memory_bytes": 64 * 1024**2, "tensor_parallel_size": 2,
        "gpu_memory_utilization": 0.5}
    assert parse_vllm_parameters(["--max-model-len=4K"]) == {"max_model_len": 4096}
    with pytest.raises(ValueError, match="--max-model-len expects a number, got 'abc'"):
        parse_vllm_parameters(["--max-model-len", "abc"])
    with pytest.raises(ValueError, match="between 0 and 1"):
        parse_vllm_parameters(["--gpu-memory-utilization", "1.5"])


@pytest.mark.parametrize(("backend", "params", "problem"), [
    ("llama-box", ["--port", "1"], "--port is set by aiMindServe and cannot be overridden"),
    ("llama-box", ["-m=/other.gguf"], "-m is set by aiMindServe"),
    ("vllm", ["--served-model-name", "x"], "--served-model-name is set by aiMindServe"),
    ("vox-box", ["--data-dir", "/tmp"], "--data-dir is set by aiMindServe"),
    ("vox-box", ["--device=cuda:1"], "--device is set by aiMindServe"),
    ("vllm", ["--max-model-len"], "--max-model-len needs a value"),
    ("llama-box", ["4096"], "'4096' must follow the flag whose value it is"),
])
def test_each_backend_refuses_its_own_reserved_flags(backend, params, problem):
    assert any(problem in p for p in get_backend(backend).check_parameters(params))


def test_a_flag_reserved_by_one_backend_is_fine_for_another():
    assert get_backend("vllm").check_parameters(["--device", "cpu"]) == []
    assert get_backend("llama-box").check_parameters(["--ctx-size", "512", "--jinja"]) == []


def test_placement_variables_cannot_be_set_by_a_models_env():
    backend = get_backend("vllm")
    assert backend.check_env({"CUDA_VISIBLE_DEVICES": "0"}) == [
        "CUDA_VISIBLE_DEVICES is set by aiMindServe from the placement and cannot be overridden"]
    assert backend.check_env({"1BAD": "x"}) == ["'1BAD' is not a valid environment variable name"]
    assert backend.check_env({"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}) == []
