"""vLLM selectors: GPUs only. vLLM takes `--gpu-memory-utilization` of each GPU it uses, so that is the claim."""

from __future__ import annotations

from functools import partial

from models_app.models import Model
from scheduler_app.estimate import ModelEstimate
from scheduler_app.estimators import hf
from scheduler_app.resources import WorkerResources, gib
from scheduler_app.selectors.common import Candidate, Reasons, allowed_gpus, fewest_gpus, make_claim, manual_gpus


def _tp_sizes(est: ModelEstimate, gpu_count: int, picked: list[int] | None) -> list[int]:
    if est.params.get("tensor_parallel_size"):
        return [int(est.params["tensor_parallel_size"])]
    if picked is not None:
        return [len(picked)]
    if est.hf is None:
        return [1]
    return hf.tensor_parallel_sizes(est.hf, gpu_count)


def gpus_on_one_worker(model: Model, est: ModelEstimate, pool: list[WorkerResources],
                       reasons: Reasons) -> list[Candidate]:
    share = float(est.params.get("gpu_memory_utilization") or hf.DEFAULT_GPU_MEMORY_UTILIZATION)
    found = []
    for res in pool:
        gpus = allowed_gpus(model, res)
        if not gpus:
            reasons.add(res.worker.name, "has no GPU; vLLM runs on GPUs only")
            continue
        picked = manual_gpus(model, res)
        if est.hf is not None and picked is not None and est.hf.n_head % len(picked):
            reasons.add(res.worker.name,
                        f"{len(picked)} GPUs do not divide the model's {est.hf.n_head} attention heads")
            continue
        for tp in _tp_sizes(est, len(gpus), picked):
            need = hf.needed_per_gpu(est.hf, est.params, tp) if est.hf else 0
            usable = [i for i in gpus if share * res.gpu_total[i] <= res.gpu_free[i]
                      and need <= share * res.gpu_total[i]]
            usable.sort(key=lambda i: (-res.gpu_free[i], i))
            if len(usable) >= tp and res.ram_free >= hf.VLLM_RAM:
                chosen = sorted(usable[:tp])
                vram = {i: int(share * res.gpu_total[i]) for i in chosen}
                found.append(Candidate(res, chosen, partial(make_claim, ram=hf.VLLM_RAM, vram=vram,
                                                                       gpu_memory_utilization=share)))
                break
        else:
            largest = max(res.gpu_total[i] for i in gpus)
            need = hf.needed_per_gpu(est.hf, est.params, 1) if est.hf else 0
            reasons.add(res.worker.name, f"needs {gib(need)} VRAM on 1 GPU (or split by tensor parallelism) within "
                                         f"{share:g} of each GPU; largest GPU is {gib(largest)}, free "
                                         f"{gib(max(res.gpu_free[i] for i in gpus))}")
    return fewest_gpus(found)


SELECTORS = [gpus_on_one_worker]
