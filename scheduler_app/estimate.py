"""What a model needs, from its metadata, before anything is placed or downloaded.

Also where the backend is chosen when the user left it empty, from the backends registry: the first backend that
serves the model's format and is meant for its categories (GGUF → llama-box, speech → vox-box, other Hugging
Face-format models → vLLM).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from models_app.choices import CategoryChoices, SourceChoices
from models_app.models import Model
from models_app.sources import RangeFile, SourceError, get_source, hub_spec, model_ggufs
from models_app.sources.local import gguf_files_under, looks_gguf, model_format
from scheduler_app.estimators import hf
from scheduler_app.estimators.gguf import GGUFModelInfo, LlamaBoxClaim, estimate, model_info
from scheduler_app.estimators.gguf_reader import GGUFFormatError, read_gguf_header
from scheduler_app.estimators.vox_box import VoxBoxClaim, vox_box_claim
from workers_app import backends

DEFAULT_CTX_SIZE = 8192


@dataclass
class ModelEstimate:
    backend: str
    categories: list[str]
    gguf: GGUFModelInfo | None = None
    hf: hf.HFModelInfo | None = None
    params: dict = field(default_factory=dict)
    note: str = ""  # why the claim is unknown, when it is
    _claims: dict = field(default_factory=dict, repr=False)

    @property
    def known(self) -> bool:
        return self.gguf is not None or self.hf is not None

    @property
    def total_layers(self) -> int:
        return self.gguf.n_layer + 1 if self.gguf else 1

    @property
    def ctx_size(self) -> int:
        if self.params.get("ctx_size"):
            return int(self.params["ctx_size"])
        if self.gguf and self.gguf.context_length:
            return min(DEFAULT_CTX_SIZE, self.gguf.context_length)
        return DEFAULT_CTX_SIZE

    def claim(self, *, offload_layers: int, gpu_count: int, tensor_split: list[float] | None = None) -> LlamaBoxClaim:
        """llama-box claim, cached: the scheduler asks for the same shapes for every worker."""
        split = tensor_split or self.params.get("tensor_split")
        key = (offload_layers, gpu_count, tuple(split) if split else None)
        if key not in self._claims:
            self._claims[key] = self._compute_claim(offload_layers, gpu_count, split)
        return self._claims[key]

    def _compute_claim(self, offload_layers: int, gpu_count: int, split: list[float] | None) -> LlamaBoxClaim:
        if self.gguf is None:
            return LlamaBoxClaim(ram=0, vram={i: 0 for i in range(gpu_count)}, offload_layers=offload_layers,
                                 total_layers=0, tensor_split=split)
        return estimate(self.gguf, ctx_size=self.ctx_size, offload_layers=offload_layers, gpu_count=gpu_count,
                        tensor_split=split, cache_type_k=self.params.get("cache_type_k", "f16"),
                        cache_type_v=self.params.get("cache_type_v", "f16"),
                        parallel=int(self.params.get("parallel") or 4),
                        cache_ram=max(0, int(self.params.get("cache_ram_mib") or 0)) * 1024**2)

    def vox_box(self) -> VoxBoxClaim:
        if self.hf is None:
            return VoxBoxClaim(0, "unknown")
        return vox_box_claim(self.hf.weight_bytes, self.hf.architectures)


class EstimateError(Exception):
    """The model's files cannot be read or understood: an error, not a wait — unless `retry` (a hub that could not
    be reached), when the instance stays pending and the next scheduling pass asks again."""

    def __init__(self, message: str, retry: bool = False):
        super().__init__(message)
        self.retry = retry


def choose_backend(model: Model, fmt: str, categories: list[str]) -> str:
    if model.backend:
        return model.backend
    try:
        return backends.choose_backend(fmt, categories)
    except backends.BackendError as exc:
        raise EstimateError(str(exc)) from exc


def _params_for(model: Model, backend: str) -> dict:
    try:
        return backends.get_backend(backend).parse_parameters(list(model.backend_parameters or []))
    except (ValueError, backends.BackendError) as exc:
        raise EstimateError(f"backend_parameters: {exc}") from exc


def _unknown(model: Model, note: str) -> ModelEstimate:
    categories = list(model.categories or [CategoryChoices.LLM])
    backend = choose_backend(model, "gguf" if looks_gguf(model) else "hf", categories)
    return ModelEstimate(backend, categories, params=_params_for(model, backend), note=note)


@lru_cache(maxsize=128)
def _read_header_cached(path: str, size: int, mtime_ns: int):
    return read_gguf_header(path)


def read_header(path: Path):
    """Headers are re-read only when the file changes: every placement and evaluation asks again."""
    stat = path.stat()
    return _read_header_cached(str(path), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=64)
def _remote_gguf_info(hub: str, repo: str, pattern: str, endpoint: str) -> GGUFModelInfo:
    """Headers over HTTP range requests: a few MB of an 8B file, not the file. (`endpoint`: part of the key.)"""
    source = get_source(hub)
    parts = model_ggufs(source.resolve(repo, pattern))
    if not parts:
        raise EstimateError(f"no GGUF file in {repo} matches {pattern!r}")
    headers = []
    for part in parts:
        with RangeFile(source.file_url(repo, part.path)) as remote:
            headers.append(read_gguf_header(remote))
    return model_info(headers)


@lru_cache(maxsize=64)
def _remote_hf_info(hub: str, repo: str, endpoint: str) -> hf.HFModelInfo:
    source = get_source(hub)
    sizes = {f.path: f.size for f in source.list_files(repo)}
    if "config.json" not in sizes:
        raise EstimateError(f"{repo} has neither a GGUF file pattern nor a config.json")
    with RangeFile(source.file_url(repo, "config.json")) as remote:
        config = json.loads(remote.read())
    return hf.info_from_config(config, hf.weight_files_size(sizes))


def _from_gguf(model: Model, info: GGUFModelInfo) -> ModelEstimate:
    categories = list(model.categories or info.categories)
    backend = choose_backend(model, "gguf", categories)
    return ModelEstimate(backend, categories, gguf=info, params=_params_for(model, backend))


def _from_hf(model: Model, info: hf.HFModelInfo, fmt: str = "hf") -> ModelEstimate:
    categories = list(model.categories or info.categories)
    backend = choose_backend(model, fmt, categories)
    return ModelEstimate(backend, categories, hf=info, params=_params_for(model, backend))


def _estimate_remote(model: Model) -> ModelEstimate:
    hub, repo, pattern = hub_spec(model)
    endpoint = get_source(hub).endpoint
    try:
        if pattern:
            return _from_gguf(model, _remote_gguf_info(hub, repo, pattern, endpoint))
        return _from_hf(model, _remote_hf_info(hub, repo, endpoint))
    except SourceError as exc:
        raise EstimateError(f"{model.get_source_display()}: {exc}", retry=exc.status >= 500) from exc
    except (GGUFFormatError, ValueError) as exc:
        raise EstimateError(f"cannot read the metadata of {repo}: {exc}") from exc


def estimate_model(model: Model) -> ModelEstimate:
    if model.source != SourceChoices.LOCAL_PATH:
        return _estimate_remote(model)
    path = Path(model.local_path)
    if not path.exists() or not os.access(path, os.R_OK):
        return _unknown(model, f"the server cannot read {path}; resource claim unknown (0), placed by strategy")
    fmt = model_format(path)
    if fmt in ("hf", "faster-whisper"):
        return _estimate_hf_dir(model, path, fmt)
    files = gguf_files_under(path)
    if not files:
        raise EstimateError(f"no .gguf file or config.json found at {path}")
    try:
        headers = [read_header(f) for f in files]
    except (GGUFFormatError, OSError) as exc:
        raise EstimateError(f"cannot read GGUF metadata of {files[0]}: {exc}") from exc
    return _from_gguf(model, model_info(headers))


def _estimate_hf_dir(model: Model, path: Path, fmt: str) -> ModelEstimate:
    try:
        info = hf.info_from_dir(path)
    except (OSError, ValueError) as exc:
        raise EstimateError(f"cannot read {path / 'config.json'}: {exc}") from exc
    return _from_hf(model, info, fmt)
