"""What each worker can still give: total − system_reserved − the claims of instances already placed there."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

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

    @property
    def has_gpus(self) -> bool:
        return bool(self.gpu_total)

    def used_fraction(self) -> float:
        total = self.ram_total + sum(self.gpu_total.values())
        free = self.ram_free + sum(self.gpu_free.values())
        return 1 - free / total if total else 1.0


def claims_by_worker(worker_ids: list[int], exclude_instance_id: int | None = None) -> dict[int, list[dict]]:
    placed = (ModelInstance.objects.filter(worker_id__in=worker_ids)
              .exclude(pk=exclude_instance_id).values_list("worker_id", "computed_resource_claim", "gpu_indexes"))
    grouped: dict[int, list[dict]] = defaultdict(list)
    for worker_id, claim, gpu_indexes in placed:
        grouped[worker_id].append({"claim": claim or {}, "gpu_indexes": gpu_indexes or []})
    return grouped


def worker_resources(worker: Worker, placed: list[dict]) -> WorkerResources:
    reserved = worker.system_reserved or {}
    reserved_vram = int(reserved.get("vram") or 0)
    gpu_total = {int(g.get("index", n)): max(0, int((g.get("memory") or {}).get("total") or 0) - reserved_vram)
                 for n, g in enumerate(worker.gpus)}
    ram_total = max(0, worker.ram_total - int(reserved.get("ram") or 0))
    res = WorkerResources(worker, ram_total=ram_total, ram_free=ram_total, gpu_total=gpu_total,
                          gpu_free=dict(gpu_total), gpu_instance_count={i: 0 for i in gpu_total})
    for item in placed:
        claim = item["claim"]
        res.instance_count += 1
        res.ram_free -= int(claim.get("ram") or 0)
        for index, vram in (claim.get("vram") or {}).items():
            index = int(index)
            if index in res.gpu_free:
                res.gpu_free[index] -= int(vram or 0)
                res.gpu_instance_count[index] += 1
    return res
