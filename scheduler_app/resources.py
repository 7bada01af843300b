"""What each worker can still give: total − system_reserved − the claims of instances already placed there."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from models_app.choices import ErrorKind, InstanceState
from models_app.models import ModelInstance
from workers_app.models import Worker

GIB = 1024**3


def gib(n: int | float) -> str:
    return f"{n / GIB:.1f} GiB"


@dataclass
class WorkerResources:
    worker: Worker
    ram_total: int
    ram_free: int
    gpu_total: dict[int, int] = field(default_factory=dict)
    gpu_free: dict[int, int] = field(default_factory=dict)
    instance_count: int = 0
    gpu_instance_count: dict[int, int] = field(default_factory=dict)
    booked: int = 0  # bytes of RAM and VRAM claimed so far

    @property
    def has_gpus(self) -> bool:
        return bool(self.gpu_total)

    def book(self, claim: dict) -> None:
        """Take a placed claim off what is free, so the next placement in the same pass sees it."""
        self.instance_count += 1
        ram = int(claim.get("ram") or 0)
        self.ram_free -= ram
        self.booked += ram
        for index, vram in (claim.get("vram") or {}).items():
            index = int(index)
            if index in self.gpu_free:
                self.gpu_free[index] -= int(vram or 0)
                self.gpu_instance_count[index] += 1
                self.booked += int(vram or 0)

    def used_fraction(self) -> float:
        capacity = self.ram_total + sum(self.gpu_total.values())
        return self.booked / capacity if capacity else 1.0


def claims_by_worker(exclude_instance_ids: list[int] = ()) -> dict[int, list[dict]]:
    """The claims of every placed instance, per worker (one query for the whole cluster): the main's on its worker,
    each RPC server's (`distributed_servers`) on that server's worker. An instance stopped by a permanent error holds
    none: it runs nothing until it is edited or deleted."""
    placed = (ModelInstance.objects.filter(worker__isnull=False).exclude(pk__in=list(exclude_instance_ids))
              .exclude(state=InstanceState.ERROR, error_kind=ErrorKind.PERMANENT)
              .values_list("worker_id", "computed_resource_claim", "distributed_servers"))
    grouped: dict[int, list[dict]] = defaultdict(list)
    for worker_id, claim, servers in placed:
        grouped[worker_id].append(claim or {})
        for server in servers or []:  # filtered here: JSONField __contains does not work on SQLite
            if server.get("worker_id") is not None:
                grouped[int(server["worker_id"])].append(server.get("computed_resource_claim") or {})
    return grouped


def worker_resources(worker: Worker, placed: list[dict]) -> WorkerResources:
    reserved = worker.system_reserved or {}
    reserved_vram = int(reserved.get("vram") or 0)
    gpu_total = {int(g.get("index", n)): max(0, int((g.get("memory") or {}).get("total") or 0) - reserved_vram)
                 for n, g in enumerate(worker.gpus)}
    ram_total = max(0, worker.ram_total - int(reserved.get("ram") or 0))
    res = WorkerResources(worker, ram_total=ram_total, ram_free=ram_total, gpu_total=gpu_total,
                          gpu_free=dict(gpu_total), gpu_instance_count={i: 0 for i in gpu_total})
    for claim in placed:
        res.book(claim)
    return res
