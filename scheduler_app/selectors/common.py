"""What every selector shares: candidates, the reasons they give, and the claim format stored on instances."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property, partial

from models_app.models import Model
from scheduler_app.estimate import ModelEstimate
from scheduler_app.filters import parse_gpu_ids
from scheduler_app.resources import WorkerResources


@dataclass
class Subordinate:
    """One ggml-rpc-server of a placement across workers: on one GPU of another worker, or on a CPU-only worker."""

    resources: WorkerResources
    gpu_indexes: list[int]
    claim: dict


@dataclass
class Candidate:
    """A possible placement. The stored claim is built only for the one chosen (thousands are compared).
    `subordinates`: the RPC servers the main's llama-server uses, in `--rpc` order (placements across workers).
    `preference`: what its selector prefers before the strategy scores, lowest first (fewest GPUs, most layers on
    GPU): each worker offers its own best, and the pool's best of those wins."""

    resources: WorkerResources
    gpu_indexes: list[int]
    build_claim: Callable[[], dict]
    offload_layers: int = 0
    subordinates: list[Subordinate] = field(default_factory=list)
    preference: tuple = ()

    @property
    def worker_name(self) -> str:
        return self.resources.worker.name

    @cached_property
    def claim(self) -> dict:
        return self.build_claim()


def distributed_servers_for(candidate: Candidate) -> list[dict]:
    """The instance's `distributed_servers`, as stored and shown: one per RPC server, in `--rpc` order.

    `attempt` numbers the parts' runs: each placement starts at the time of placing in milliseconds (a part a worker
    still runs from an earlier placement of the same instance never passes for one of this placement), and each
    failure or restart adds one."""
    first = int(time.time() * 1000)
    return [{"worker_id": s.resources.worker.id, "worker_name": s.resources.worker.name,
             "gpu_indexes": list(s.gpu_indexes), "computed_resource_claim": s.claim, "host": None, "port": None,
             "pid": None, "state": "pending", "attempt": first} for s in candidate.subordinates]


ACROSS_WORKERS = "distributed inference"  # the Reasons key of the selectors that combine workers: a story of a group


class Reasons:
    """Why workers were passed over, grouped per worker, in the order they were found."""

    def __init__(self) -> None:
        self.by_worker: dict[str, list[str]] = defaultdict(list)

    def add(self, worker_name: str, reason: str) -> None:
        if reason not in self.by_worker[worker_name]:
            self.by_worker[worker_name].append(reason)

    def copy(self) -> Reasons:
        other = Reasons()
        for name, reasons in self.by_worker.items():
            other.by_worker[name] = list(reasons)
        return other

    def __bool__(self) -> bool:
        return bool(self.by_worker)

    def render(self, names_per_reason: int = 3) -> str:
        """Workers with the same story share one line, so a 1,000-worker cluster still gives a short message."""
        grouped: dict[str, list[str]] = defaultdict(list)
        for name, reasons in self.by_worker.items():
            grouped["; ".join(reasons)].append(name)
        parts = []
        for text, names in grouped.items():
            shown = ", ".join(names[:names_per_reason])
            if len(names) > names_per_reason:
                shown += f" and {len(names) - names_per_reason} more"
            parts.append(f"{shown}: {text}")
        return ". ".join(parts)


Selector = Callable[[Model, ModelEstimate, list[WorkerResources], Reasons], list[Candidate]]


def per_worker(selector: Selector) -> Selector:
    """Mark a selector whose candidates for one worker are independent of the rest of the pool (a choice across the
    pool, such as the fewest GPUs, is a `preference` of each candidate instead)."""
    selector.per_worker = True
    return selector


def make_claim(*, ram: int, vram: dict[int, int], offload_layers: int = 0, total_layers: int = 0,
               tensor_split: list[float] | None = None, unknown: bool = False, **extra) -> dict:
    """The claim as stored and shown (SPEC §3): integer bytes, `vram` keyed by the GPU index as a string.
    `unknown`: the server could not read the model's metadata, so the numbers are not an estimate."""
    claim = {"ram": int(ram), "vram": {str(i): int(v) for i, v in sorted(vram.items())},
             "offload_layers": offload_layers, "total_layers": total_layers, "tensor_split": tensor_split, **extra}
    if unknown:
        claim["unknown"] = True
    return claim


def llama_box_candidate(res: WorkerResources, gpu_indexes: list[int], claim, est: ModelEstimate,
                        preference: tuple = ()) -> Candidate:
    return Candidate(res, gpu_indexes, partial(llama_box_claim, claim, gpu_indexes, est), claim.offload_layers,
                     preference=preference)


def llama_box_claim(claim, gpu_indexes: list[int], est: ModelEstimate) -> dict:
    """A llama-box claim, mapped from GPU positions to real indexes, with the context size the worker must use."""
    return make_claim(ram=claim.ram, vram={gpu_indexes[pos]: v for pos, v in claim.vram.items()},
                      offload_layers=claim.offload_layers, total_layers=claim.total_layers,
                      tensor_split=claim.tensor_split, ctx_size=est.ctx_size if est.known else None,
                      unknown=not est.known)


def picked_on(picked: dict[str, list[int]], res: WorkerResources) -> list[int] | None:
    """The GPUs picked by hand on this worker, or None when scheduling is automatic. `picked`: the model's
    `parse_gpu_ids`, parsed once per selector rather than once per worker."""
    if not picked:
        return None
    return [i for i in picked.get(res.worker.name, []) if i in res.gpu_total]


def allowed_gpus(model: Model, res: WorkerResources) -> list[int]:
    return list(allowed_on(parse_gpu_ids(model), res))


def allowed_on(picked: dict[str, list[int]], res: WorkerResources) -> list[int]:
    """`allowed_gpus` from the parsed GPU selector; may be the worker's own list: read it, never change it."""
    return res.gpu_order if not picked else [i for i in picked.get(res.worker.name, []) if i in res.gpu_total]
