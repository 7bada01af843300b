"""vox-box selectors: one GPU when one has room, else the CPU (speech models are small)."""

from __future__ import annotations

from functools import partial

from models_app.models import Model
from scheduler_app.estimate import ModelEstimate
from scheduler_app.filters import parse_gpu_ids
from scheduler_app.resources import WorkerResources, gib
from scheduler_app.scorers import best_gpu
from scheduler_app.selectors.common import Candidate, Reasons, allowed_on, make_claim, per_worker


@per_worker
def one_gpu(model: Model, est: ModelEstimate, pool: list[WorkerResources], reasons: Reasons) -> list[Candidate]:
    need = est.vox_box().bytes
    picked = parse_gpu_ids(model)
    found = []
    for res in pool:
        gpus = allowed_on(picked, res)
        fitting = [i for i in gpus if need <= res.gpu_free[i]]
        if fitting:  # the one of them the strategy ranks first (scorers.best_gpu)
            i = best_gpu(res, fitting, model.placement_strategy)
            found.append(Candidate(res, [i], partial(make_claim, ram=0, vram={i: need}, unknown=not est.known)))
        if gpus and not fitting:
            roomiest = max(gpus, key=lambda i: res.gpu_free[i])
            reasons.add(res.worker.name, f"needs {gib(need)} VRAM on 1 GPU, largest free is "
                                         f"{gib(res.gpu_free[roomiest])}{res.others_note([roomiest])}")
    return found


@per_worker
def cpu(model: Model, est: ModelEstimate, pool: list[WorkerResources], reasons: Reasons) -> list[Candidate]:
    if parse_gpu_ids(model):
        return []  # GPUs were picked by hand
    need = est.vox_box().bytes
    found = []
    for res in pool:
        if need <= res.ram_free:
            found.append(Candidate(res, [], partial(make_claim, ram=need, vram={}, unknown=not est.known)))
        else:
            reasons.add(res.worker.name, f"needs {gib(need)} RAM on CPU, has {gib(res.ram_free)} free")
    return found


SELECTORS = [one_gpu, cpu]
