"""What a model needs, from its metadata, before anything is placed or downloaded."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from models_app.choices import BackendChoices, CategoryChoices, SourceChoices
from models_app.models import Model
from scheduler_app.estimators.gguf import GGUFModelInfo, LlamaBoxClaim, estimate, model_info, parse_backend_parameters
from scheduler_app.estimators.gguf_reader import GGUFFormatError, read_gguf_header, split_gguf_parts

DEFAULT_CTX_SIZE = 8192


@dataclass
class ModelEstimate:
    backend: str
    categories: list[str]
    info: GGUFModelInfo | None = None
    params: dict = field(default_factory=dict)
    note: str = ""  # why the claim is unknown, when it is

    @property
    def known(self) -> bool:
        return self.info is not None

    @property
    def total_layers(self) -> int:
        return self.info.n_layer + 1 if self.info else 0

    @property
    def ctx_size(self) -> int:
        if self.params.get("ctx_size"):
            return int(self.params["ctx_size"])
        if self.info and self.info.context_length:
            return min(DEFAULT_CTX_SIZE, self.info.context_length)
        return DEFAULT_CTX_SIZE

    def claim(self, *, offload_layers: int, gpu_count: int, tensor_split: list[float] | None = None) -> LlamaBoxClaim:
        if self.info is None:
            return LlamaBoxClaim(ram=0, vram={i: 0 for i in range(gpu_count)}, offload_layers=offload_layers,
                                 total_layers=0, tensor_split=tensor_split)
        return estimate(
            self.info,
            ctx_size=self.ctx_size,
            offload_layers=offload_layers,
            gpu_count=gpu_count,
            tensor_split=tensor_split or self.params.get("tensor_split"),
            cache_type_k=self.params.get("cache_type_k", "f16"),
            cache_type_v=self.params.get("cache_type_v", "f16"),
            parallel=int(self.params.get("parallel") or 4),
        )


class EstimateError(Exception):
    """The model's files are there but cannot be understood: an error, not a wait."""


def gguf_files_under(path: Path) -> list[Path]:
    """The GGUF file(s) a local path names: the file itself, or the model in a directory (no mmproj)."""
    if path.is_file():
        return split_gguf_parts(path)
    candidates = sorted(p for p in path.glob("*.gguf") if "mmproj" not in p.name.lower())
    if not candidates:
        return []
    return split_gguf_parts(candidates[0])


def estimate_model(model: Model) -> ModelEstimate:
    params = parse_backend_parameters(list(model.backend_parameters or []))
    categories = list(model.categories or [])
    backend = model.backend or BackendChoices.LLAMA_BOX
    if model.source != SourceChoices.LOCAL_PATH:
        return ModelEstimate(backend, categories or [CategoryChoices.LLM], params=params,
                             note=f"estimates for {model.get_source_display()} sources are not available yet")
    path = Path(model.local_path)
    if not path.exists() or not os.access(path, os.R_OK):
        return ModelEstimate(backend, categories or [CategoryChoices.LLM], params=params,
                             note=f"the server cannot read {path}; resource claim unknown (0), placed by strategy")
    files = gguf_files_under(path)
    if not files:
        raise EstimateError(f"no .gguf file found at {path}")
    try:
        headers = [read_gguf_header(f) for f in files]
    except (GGUFFormatError, OSError) as exc:
        raise EstimateError(f"cannot read GGUF metadata of {files[0]}: {exc}") from exc
    info = model_info(headers)
    return ModelEstimate(backend, categories or list(info.categories), info=info, params=params)
