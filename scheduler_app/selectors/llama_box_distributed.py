"""llama-box across workers (llama.cpp RPC): the main worker runs `llama-server --rpc … -ngl K -ts …`, and each
subordinate runs one ggml-rpc-server per GPU it gives (GPU workers) or one on its CPU (CPU-only workers).

llama-server's devices are the RPC servers in `--rpc` order, then the main's own GPUs; `-ngl K` keeps the first
n_layer - (K - 1) blocks in the main's RAM and hands the rest, then the output layer, to the devices in order,
`-ts` weights deciding how many each. The weights written here are the layer counts themselves, so llama.cpp's
proportional assignment reproduces exactly the layers priced per device.

Automatic placements come last in the pipeline, when no single worker holds the model with or without CPU offloading
(as the model allows): the fewest workers of one kind (GPU or CPU-only, never mixed), the emptiest first. GPUs picked
by hand on several workers come first instead, and are used exactly (the one-worker selectors then step aside).
"""

from __future__ import annotations

from dataclasses import dataclass

from models_app.models import Model
from scheduler_app.estimate import ModelEstimate
from scheduler_app.estimators.gguf import RPC_SERVER_OVERHEAD, SplitClaim, SplitCosts, split_costs, split_layers
from scheduler_app.filters import parse_gpu_ids
from scheduler_app.resources import WorkerResources, gib
from scheduler_app.selectors.common import ACROSS_WORKERS, Candidate, Reasons, Subordinate, allowed_gpus, make_claim

REASON = ACROSS_WORKERS
GROUPS_TRIED = 8  # group sizes tried once the lower bound allows; beyond, each added worker is smaller than the last
MAINS_TRIED = 4  # CPU workers tried as the main of one group


@dataclass
class _Worker:
    res: WorkerResources
    gpus: list[int]  # the GPUs it gives; [] for a CPU-only worker

    @property
    def name(self) -> str:
        return self.res.worker.name

    @property
    def free(self) -> int:
        if self.gpus:
            return sum(max(self.res.gpu_free[i], 0) for i in self.gpus)
        return max(self.res.ram_free, 0)

    def most_blocks(self, costs: SplitCosts) -> int:
        """At most how many whole blocks it could hold, were it a subordinate and every block the smallest."""
        smallest = min(costs.block)
        if self.gpus:
            return sum(max(0, self.res.gpu_free[i] - costs.device_fixed) // smallest for i in self.gpus)
        return max(0, self.res.ram_free - RPC_SERVER_OVERHEAD - costs.device_fixed) // smallest


def across_picked_gpus(model: Model, est: ModelEstimate, pool: list[WorkerResources],
                       reasons: Reasons) -> list[Candidate]:
    """GPUs picked by hand on several workers: the model over exactly those GPUs, or nowhere."""
    picked = parse_gpu_ids(model)
    if len(picked) < 2:
        return []
    if not model.distributed_inference_across_workers:
        reasons.add(REASON, f"the picked GPUs are on {len(picked)} workers, and it is off for this model")
        return []
    if est.gguf is None or not est.gguf.n_layer:
        reasons.add(REASON, "the model's layers are unknown (its metadata could not be read), so they cannot be split")
        return []
    by_name = {res.worker.name: res for res in pool}
    if any(name not in by_name for name in picked):
        return []  # the filters said why each missing worker was left out
    workers = _emptiest_first([_Worker(by_name[name], sorted(allowed_gpus(model, by_name[name]))) for name in picked])
    costs = _costs(est)
    if _least_need(costs, True, len(workers), sum(len(w.gpus) for w in workers)) > sum(w.free for w in workers):
        reasons.add(REASON, _shortfall(workers, costs, ""))
        return []
    found = _first_fit(workers, costs, est)
    if isinstance(found, Candidate):
        return [found]
    reasons.add(REASON, _shortfall(workers, costs, found))
    return []


def across_workers(model: Model, est: ModelEstimate, pool: list[WorkerResources], reasons: Reasons) -> list[Candidate]:
    """The fewest workers (GPU workers first, else CPU-only ones) that hold the model together."""
    if parse_gpu_ids(model) or est.gguf is None or not est.gguf.n_layer or len(pool) < 2:
        return []
    if not model.distributed_inference_across_workers:
        reasons.add(REASON, "is off for this model")
        return []
    costs = _costs(est)
    smallest_gpu = costs.device_fixed + max(costs.block)  # a GPU with less room could hold no block
    gpu_workers, cpu_workers = [], []
    for res in pool:
        if res.has_gpus:
            usable = [i for i in res.gpu_order if res.gpu_free[i] >= smallest_gpu]  # no GPU was picked by hand
            if usable:
                gpu_workers.append(_Worker(res, usable))
        else:
            cpu_workers.append(_Worker(res, []))
    if len(gpu_workers) < 2 and len(cpu_workers) < 2:
        reasons.add(REASON, f"needs 2 or more GPU workers with room, or 2 or more CPU-only workers (GPU and CPU "
                            f"workers are never mixed); has {len(gpu_workers)} and {len(cpu_workers)}")
        return []
    for workers in (gpu_workers, cpu_workers):
        if len(workers) < 2:
            continue
        found = _fewest(_emptiest_first(workers), costs, est, reasons)
        if found is not None:
            return [found]
    return []


def _costs(est: ModelEstimate) -> SplitCosts:
    """The same context and cache settings `ModelEstimate.claim` prices single-worker placements with."""
    params = est.params
    return split_costs(est.gguf, ctx_size=est.ctx_size, cache_type_k=params.get("cache_type_k", "f16"),
                       cache_type_v=params.get("cache_type_v", "f16"), parallel=int(params.get("parallel") or 4),
                       cache_ram=max(0, int(params.get("cache_ram_mib") or 0)) * 1024**2)


def _emptiest_first(workers: list[_Worker]) -> list[_Worker]:
    return sorted(workers, key=lambda w: (-w.free, w.name))


def _least_need(costs: SplitCosts, on_gpus: bool, n_workers: int, n_gpus: int) -> int:
    """A lower bound of what a group needs together, in the memory it gives: VRAM on GPU workers, else RAM."""
    layers = sum(costs.block) + costs.output
    if on_gpus:
        return layers + costs.device_fixed * n_gpus
    return costs.main_fixed + layers + (n_workers - 1) * (costs.device_fixed + RPC_SERVER_OVERHEAD)


def _fewest(workers: list[_Worker], costs: SplitCosts, est: ModelEstimate, reasons: Reasons) -> Candidate | None:
    """Try the 2, 3, … emptiest workers; the first group that fits wins. Groups too small by the lower bounds (bytes,
    whole blocks) are skipped without a try, and at most `GROUPS_TRIED` are tried: a large cluster costs one pass."""
    on_gpus = bool(workers[0].gpus)
    free = n_gpus = blocks = tried = 0
    why = ""
    for n, worker in enumerate(workers, 1):
        free += worker.free
        n_gpus += len(worker.gpus)
        blocks += worker.most_blocks(costs)
        if n < 2 or _least_need(costs, on_gpus, n, n_gpus) > free or blocks < len(costs.block):
            continue
        found = _first_fit(workers[:n], costs, est)
        if isinstance(found, Candidate):
            return found
        why, tried = found, tried + 1
        if tried == GROUPS_TRIED:
            break
    reasons.add(REASON, _shortfall(workers[:n], costs, why))
    return None


def _shortfall(group: list[_Worker], costs: SplitCosts, why: str) -> str:
    """Why the largest group tried does not fit: its memory against the lower bound, or what the last try found."""
    on_gpus = bool(group[0].gpus)
    kind, memory = ("GPU", "VRAM") if on_gpus else ("CPU", "RAM")
    free = sum(w.free for w in group)
    others = sum(w.res.gpu_others.get(i, 0) for w in group for i in w.gpus)
    note = f" ({gib(others)} used by other processes)" if others else ""
    if why:
        return f"across {len(group)} {kind} workers ({gib(free)} {memory} free{note}): {why}"
    need = _least_need(costs, on_gpus, len(group), sum(len(w.gpus) for w in group))
    return f"across {len(group)} {kind} workers needs {gib(need)} {memory}, they have {gib(free)} free{note}"


def _first_fit(group: list[_Worker], costs: SplitCosts, est: ModelEstimate) -> Candidate | str:
    """The placement with the emptiest worker that can be the main; else why the last try failed. On GPU workers the
    main only needs RAM for its own part; on CPU workers its share of the blocks depends on it, so a few are tried."""
    if group[0].gpus:
        mains = [next((w for w in group if w.res.ram_free >= costs.main_fixed), group[0])]
    else:
        mains = group[:MAINS_TRIED]
    why = "no split fits"
    for main in mains:
        subordinates = [w for w in group if w is not main]
        place = _place_gpus if main.gpus else _place_cpus
        found = place(main, subordinates, costs, est)
        if isinstance(found, Candidate):
            return found
        why = found
    return why


def _place_gpus(main: _Worker, subordinates: list[_Worker], costs: SplitCosts,
                est: ModelEstimate) -> Candidate | str:
    """Every layer on a GPU: one RPC server per subordinate GPU, then the main's own GPUs."""
    if main.res.ram_free < costs.main_fixed:
        return (f"the main llama-server needs {gib(costs.main_fixed)} RAM, {main.name} has "
                f"{gib(main.res.ram_free)} free")
    for w in subordinates:
        if w.res.ram_free < RPC_SERVER_OVERHEAD * len(w.gpus):
            return f"{w.name} has no RAM left for its RPC servers ({gib(w.res.ram_free)} free)"
    devices = [(w, [i]) for w in subordinates for i in w.gpus] + [(main, [i]) for i in main.gpus]
    split = _fit(costs, None, [w.res.gpu_free[gpus[0]] for w, gpus in devices])
    if split is None:
        return "whole layers do not split to fit each GPU"
    return _candidate(main, devices[:len(devices) - len(main.gpus)], split, est)


def _place_cpus(main: _Worker, subordinates: list[_Worker], costs: SplitCosts,
                est: ModelEstimate) -> Candidate | str:
    """The first blocks in the main's RAM, the rest on one RPC server per subordinate, the emptiest last: it also
    holds the output layer."""
    subordinates = sorted(subordinates, key=lambda w: (w.free, w.name))
    split = _fit(costs, main.res.ram_free, [w.res.ram_free - RPC_SERVER_OVERHEAD for w in subordinates])
    if split is None:
        return f"whole layers do not split to fit each worker's RAM with {main.name} as the main"
    return _candidate(main, [(w, []) for w in subordinates], split, est)


def _candidate(main: _Worker, servers: list[tuple[_Worker, list[int]]], split: SplitClaim,
               est: ModelEstimate) -> Candidate:
    """`servers`: the RPC servers in `--rpc` order, the first devices of `split`; the main's GPUs are the rest."""
    subordinates = []
    for (w, gpus), device_bytes, layers in zip(servers, split.device_bytes, split.device_layers, strict=False):
        ram, vram = (RPC_SERVER_OVERHEAD, {gpus[0]: device_bytes}) if gpus else (RPC_SERVER_OVERHEAD + device_bytes, {})
        claim = make_claim(ram=ram, vram=vram, offload_layers=layers, total_layers=split.total_layers,
                           ctx_size=est.ctx_size, layers=layers)
        subordinates.append(Subordinate(w.res, list(gpus), claim))
    local = len(servers)
    main_claim = make_claim(ram=split.main_ram, vram=dict(zip(main.gpus, split.device_bytes[local:], strict=True)),
                            offload_layers=split.offload_layers, total_layers=split.total_layers,
                            tensor_split=[float(n) for n in split.device_layers], ctx_size=est.ctx_size,
                            layers=split.cpu_blocks + sum(split.device_layers[local:]))
    return Candidate(main.res, list(main.gpus), lambda: main_claim, split.offload_layers, subordinates)


def _fit(costs: SplitCosts, cpu_room: int | None, rooms: list[int]) -> SplitClaim | None:
    """Whole blocks per slot (the main's CPU when `cpu_room` is given, then each device, the output layer on the last)
    in proportion to what each slot holds after its fixed costs; blocks then move from a slot over its room to the one
    with the most left. Every device holds at least one block; None when no split fits."""
    n_blocks = costs.total_layers - 1
    has_cpu = cpu_room is not None
    limits = ([cpu_room] if has_cpu else []) + list(rooms)
    fixed = ([costs.main_fixed] if has_cpu else []) + [costs.device_fixed] * len(rooms)
    fixed[-1] += costs.output
    average = ([sum(costs.cpu_block) / n_blocks] if has_cpu else []) + [sum(costs.block) / n_blocks] * len(rooms)
    biggest = ([max(costs.cpu_block)] if has_cpu else []) + [max(costs.block)] * len(rooms)
    floor = ([0] if has_cpu else []) + [1] * len(rooms)
    capacity = [max(0.0, (lim - f) / avg) for lim, f, avg in zip(limits, fixed, average, strict=True)]
    if sum(capacity) < n_blocks or any(c < least for c, least in zip(capacity, floor, strict=True)):
        return None
    spare = split_layers(n_blocks - sum(floor), [c - least for c, least in zip(capacity, floor, strict=True)])
    counts = [least + extra for least, extra in zip(floor, spare, strict=True)]
    for _ in range(2 * n_blocks):
        split = _split(costs, counts, has_cpu)
        used = ([split.main_ram] if has_cpu else []) + split.device_bytes
        over = [s for s, (u, lim) in enumerate(zip(used, limits, strict=True)) if u > lim]
        if not over:
            return split
        left = [lim - u - big for lim, u, big in zip(limits, used, biggest, strict=True)]
        source = over[0]
        target = max((t for t in range(len(counts)) if t != source), key=lambda t: left[t])
        if counts[source] <= floor[source] or left[target] < 0:
            return None
        counts[source] -= 1
        counts[target] += 1
    return None


def _split(costs: SplitCosts, counts: list[int], has_cpu: bool) -> SplitClaim:
    cpu_blocks = counts[0] if has_cpu else 0
    device_layers = counts[1:] if has_cpu else list(counts)
    device_layers[-1] += 1  # the output layer
    return costs.claim(cpu_blocks, device_layers)
