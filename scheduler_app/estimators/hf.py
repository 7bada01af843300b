"""Resource needs of a Hugging Face-format model under vLLM, from config.json and the weight files' sizes.

vLLM pre-allocates `--gpu-memory-utilization` (default 0.9) of *each* GPU it uses, whatever the model
needs, so that share is the claim. The model fits when its weights (split by tensor parallelism), the KV
cache for one sequence of `max_model_len` tokens and an activation allowance fit inside that share.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_MAX_MODEL_LEN = 8192
DEFAULT_GPU_MEMORY_UTILIZATION = 0.9
VLLM_RAM = 2 * 1024**3  # the vLLM API server and engine processes (CPU side), before any weights
ACTIVATION_ALLOWANCE = 1024**3  # CUDA graphs and activation peaks per GPU, on top of weights and KV
DTYPE_BYTES = {"float32": 4, "float": 4, "float16": 2, "half": 2, "bfloat16": 2, "float8": 1, "fp8": 1, "int8": 1}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


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
    config = json.loads((path / "config.json").read_text())
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


def tensor_parallel_sizes(info: HFModelInfo, limit: int) -> list[int]:
    """GPU counts vLLM accepts for this model: powers of two that divide the attention heads."""
    sizes, n = [], 1
    while n <= limit:
        if info.n_head % n == 0:
            sizes.append(n)
        n *= 2
    return sizes


_VLLM_FLAGS = {"--max-model-len": "max_model_len", "--gpu-memory-utilization": "gpu_memory_utilization",
               "--tensor-parallel-size": "tensor_parallel_size", "-tp": "tensor_parallel_size"}


def parse_vllm_parameters(params: list[str]) -> dict:
    found: dict = {}
    items = list(params)
    for i, item in enumerate(items):
        flag, eq, value = item.partition("=")
        key = _VLLM_FLAGS.get(flag)
        if key is None:
            continue
        if not eq:
            value = items[i + 1] if i + 1 < len(items) else ""
        try:
            found[key] = float(value) if key == "gpu_memory_utilization" else int(re.sub(r"[kK]$", "000", value))
        except ValueError:
            raise ValueError(f"{flag} expects a number, got {value!r}") from None
    return found
