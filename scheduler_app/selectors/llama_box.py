"""llama-box (llama.cpp) selectors: GPUs picked on several workers → one GPU → fewest GPUs on one worker → partial
offload → CPU → across workers (the last two in `llama_box_distributed`)."""

from __future__ import annotations

from models_app.models import Model
from scheduler_app.estimate import ModelEstimate
from scheduler_app.filters import parse_gpu_ids
from scheduler_app.resources import WorkerResources, gib
from scheduler_app.scorers import best_gpu
from scheduler_app.selectors.common import (
    Candidate,
    Reasons,
    allowed_on,
    llama_box_candidate,
    per_worker,
)
from scheduler_app.selectors.llama_box_distributed import across_picked_gpus, across_workers


def _fits(claim, gpus: list[int], res: WorkerResources) -> bool:
    return claim.ram <= res.ram_free and all(claim.vram.get(pos, 0) <= res.gpu_free[i] for pos, i in enumerate(gpus))


def _split_for(est: ModelEstimate, gpus: list[int], res: WorkerResources) -> list[float]:
    """The user's --tensor-split when it names every GPU, else proportional to free VRAM."""
    given = est.params.get("tensor_split")
    if given and len(given) == len(gpus):
        return list(given)
    return [float(max(res.gpu_free[i], 0)) for i in gpus]


@per_worker
def single_gpu(model: Model, est: ModelEstimate, pool: list[WorkerResources], reasons: Reasons) -> list[Candidate]:
    picked = parse_gpu_ids(model)
    if len(picked) > 1:
        return []  # one worker would ignore GPUs picked on the others
    claim = est.claim(offload_layers=est.total_layers, gpu_count=1)
    need, ram = claim.vram.get(0, 0), claim.ram
    strategy = model.placement_strategy
    found = []
    for res in pool:
        gpus = allowed_on(picked, res)
        if not gpus or (picked and len(gpus) != 1):
            continue
        free = res.gpu_free
        fitting = [i for i in gpus if need <= free[i]] if ram <= res.ram_free else None
        if fitting:  # the one of them the strategy ranks first (scorers.best_gpu)
            found.append(llama_box_candidate(res, [best_gpu(res, fitting, strategy)], claim, est))
        elif fitting is None:
            reasons.add(res.worker.name, f"needs {gib(ram)} RAM, has {gib(res.ram_free)} free")
        else:
            roomiest = max(gpus, key=lambda i: free[i])
            reasons.add(res.worker.name, f"needs {gib(need)} VRAM on 1 GPU, largest free is "
                                         f"{gib(free[roomiest])}{res.others_note([roomiest])}")
    return found


@per_worker
def multi_gpu(model: Model, est: ModelEstimate, pool: list[WorkerResources], reasons: Reasons) -> list[Candidate]:
    """The fewest GPUs of one worker that hold the whole model, split in proportion to their free VRAM; the workers
    that need the fewest win."""
    picked = parse_gpu_ids(model)
    if len(picked) > 1:
        return []
    found = []
    for res in pool:
        gpus = allowed_on(picked, res)
        if len(gpus) < 2:
            continue
        by_free = sorted(gpus, key=lambda i: (-res.gpu_free[i], i))
        subsets = [gpus] if picked else [by_free[:n] for n in range(2, len(gpus) + 1)]
        for chosen in subsets:
            split = _split_for(est, chosen, res)
            claim = est.claim(offload_layers=est.total_layers, gpu_count=len(chosen), tensor_split=split)
            if _fits(claim, chosen, res):
                found.append(llama_box_candidate(res, chosen, claim, est, preference=(len(chosen),)))
                break
        else:
            total_need = sum(est.claim(offload_layers=est.total_layers, gpu_count=1).vram.values())
            free = sum(max(res.gpu_free[i], 0) for i in gpus)
            reasons.add(res.worker.name, f"needs about {gib(total_need)} VRAM across {len(gpus)} GPUs, has "
                                         f"{gib(free)} free{res.others_note(gpus)}")
    return found


@per_worker
def partial_offload(model: Model, est: ModelEstimate, pool: list[WorkerResources], reasons: Reasons) -> list[Candidate]:
    """As many layers on the worker's GPUs as fit, the rest in RAM; the workers that offload the most win."""
    picked = parse_gpu_ids(model)
    if len(picked) > 1:
        return []
    found = []
    for res in pool:
        gpus = allowed_on(picked, res)
        if not gpus:
            continue
        if not model.cpu_offloading:
            reasons.add(res.worker.name, "cpu_offloading is off")
            continue
        split = _split_for(est, gpus, res)
        best = None
        lo, hi = 1, est.total_layers - 1
        while lo <= hi:  # VRAM use grows with the layer count: binary search the largest that fits
            mid = (lo + hi) // 2
            claim = est.claim(offload_layers=mid, gpu_count=len(gpus), tensor_split=split)
            if all(claim.vram.get(pos, 0) <= res.gpu_free[i] for pos, i in enumerate(gpus)):
                best, lo = claim, mid + 1
            else:
                hi = mid - 1
        if best is not None and best.ram <= res.ram_free:
            found.append(llama_box_candidate(res, list(gpus), best, est, preference=(-best.offload_layers,)))
        elif best is not None:
            reasons.add(res.worker.name, f"with {best.offload_layers}/{best.total_layers} layers on GPU needs "
                                         f"{gib(best.ram)} RAM, has {gib(res.ram_free)} free")
    return found


@per_worker
def cpu_only(model: Model, est: ModelEstimate, pool: list[WorkerResources], reasons: Reasons) -> list[Candidate]:
    if parse_gpu_ids(model):
        return []  # GPUs were picked by hand: never fall back to the CPU
    claim = est.claim(offload_layers=0, gpu_count=0)
    found = []
    for res in pool:
        if res.has_gpus and not model.cpu_offloading:
            reasons.add(res.worker.name, "cpu_offloading is off")
            continue
        if claim.ram <= res.ram_free:
            found.append(llama_box_candidate(res, [], claim, est))
        else:
            reasons.add(res.worker.name, f"needs {gib(claim.ram)} RAM on CPU, has {gib(res.ram_free)} free")
    return found


# Picked GPUs on several workers are honoured first; otherwise a placement across workers is the last resort.
SELECTORS = [across_picked_gpus, single_gpu, multi_gpu, partial_offload, cpu_only, across_workers]
