"""Candidate selectors for llama-box, tried in order; the first that yields candidates wins."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from models_app.models import Model
from scheduler_app.estimate import ModelEstimate
from scheduler_app.filters import parse_gpu_ids
from scheduler_app.resources import WorkerResources, gib


@dataclass
class Candidate:
    resources: WorkerResources
    gpu_indexes: list[int]
    claim: dict

    @property
    def worker_name(self) -> str:
        return self.resources.worker.name


def claim_dict(claim, gpu_indexes: list[int], est: ModelEstimate) -> dict:
    """Claims are stored with the GPU's real index as a string key (SPEC §3), plus the context size
    the estimate assumed, so the worker launches exactly what was estimated."""
    vram = {str(gpu_indexes[i]): int(v) for i, v in sorted(claim.vram.items())} if gpu_indexes else {}
    return {"ram": int(claim.ram), "vram": vram, "offload_layers": claim.offload_layers,
            "total_layers": claim.total_layers, "tensor_split": claim.tensor_split,
            "ctx_size": est.ctx_size if est.known else None}


def _allowed_gpus(model: Model, res: WorkerResources) -> list[int]:
    manual = parse_gpu_ids(model)
    if manual:
        return [i for i in manual.get(res.worker.name, []) if i in res.gpu_total]
    return sorted(res.gpu_total)


def single_gpu(model: Model, est: ModelEstimate, res: WorkerResources, reasons: list[str]) -> list[Candidate]:
    gpus = _allowed_gpus(model, res)
    if not gpus:
        return []
    claim = est.claim(offload_layers=est.total_layers, gpu_count=1)
    fits = [i for i in gpus if claim.vram.get(0, 0) <= res.gpu_free[i] and claim.ram <= res.ram_free]
    if not fits:
        largest = max(res.gpu_free[i] for i in gpus)
        reasons.append(f"{res.worker.name}: needs {gib(claim.vram.get(0, 0))} VRAM on 1 GPU, largest free is "
                       f"{gib(largest)}")
    return [Candidate(res, [i], claim_dict(claim, [i], est)) for i in fits]


def cpu_only(model: Model, est: ModelEstimate, res: WorkerResources, reasons: list[str]) -> list[Candidate]:
    if res.has_gpus and not model.cpu_offloading:
        reasons.append(f"{res.worker.name}: cpu_offloading is off")
        return []
    claim = est.claim(offload_layers=0, gpu_count=0)
    if claim.ram > res.ram_free:
        reasons.append(f"{res.worker.name}: needs {gib(claim.ram)} RAM, has {gib(res.ram_free)} free")
        return []
    return [Candidate(res, [], claim_dict(claim, [], est))]


Selector = Callable[[Model, ModelEstimate, WorkerResources, list[str]], list[Candidate]]
LLAMA_BOX_SELECTORS: list[Selector] = [single_gpu, cpu_only]


def select_candidates(model: Model, est: ModelEstimate,
                      pool: list[WorkerResources]) -> tuple[list[Candidate], list[str]]:
    reasons: list[str] = []
    for selector in LLAMA_BOX_SELECTORS:
        found = [c for res in pool for c in selector(model, est, res, reasons)]
        if found:
            return found, []
    return [], reasons
