"""What each worker can still give: total − system_reserved − the claims of instances already placed there − on each
GPU, what processes outside the product use (the worker measures it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

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
    heartbeat_fresh: bool = True  # judged when the pool was read
    gpu_order: list[int] = field(default_factory=list)  # the GPU indexes, sorted; never mutate
    capacity: int = 0  # ram_total + every GPU's total: the denominator of used_fraction
    gpu_others: dict[int, int] = field(default_factory=dict)  # VRAM held by processes the product did not start

    def __post_init__(self) -> None:
        if not self.gpu_order and self.gpu_total:
            self.gpu_order = sorted(self.gpu_total)
        if not self.capacity:
            self.capacity = self.ram_total + sum(self.gpu_total.values())

    @property
    def has_gpus(self) -> bool:
        return bool(self.gpu_total)

    def book(self, claim: dict) -> None:
        """Take a placed claim off what is free, so the next placement in the same pass sees it."""
        ram, vram = parse_claim(claim)
        self.instance_count += 1
        self.ram_free -= ram
        self.booked += ram
        for index, size in vram:
            if index in self.gpu_free:
                self.gpu_free[index] -= size
                self.gpu_instance_count[index] += 1
                self.booked += size

    def used_fraction(self) -> float:
        return self.booked / self.capacity if self.capacity else 1.0

    def others_note(self, gpus) -> str:
        """For a reason about VRAM: how much of those GPUs other processes hold (their memory is not free)."""
        others = sum(self.gpu_others.get(i, 0) for i in gpus)
        return f" ({gib(others)} used by other processes)" if others else ""


def parse_claim(claim: dict) -> tuple[int, tuple[tuple[int, int], ...]]:
    """A stored claim as (RAM bytes, ((GPU index, VRAM bytes), …))."""
    return int(claim.get("ram") or 0), tuple((int(i), int(v or 0)) for i, v in (claim.get("vram") or {}).items())


@dataclass
class ClaimTotals:
    """The claims placed on one worker, added up: how many, and their RAM and VRAM per GPU index."""

    count: int = 0
    ram: int = 0
    vram: dict[int, int] = field(default_factory=dict)
    gpu_count: dict[int, int] = field(default_factory=dict)

    def add(self, ram: int, vram: tuple[tuple[int, int], ...]) -> None:
        self.count += 1
        self.ram += ram
        for index, size in vram:
            self.vram[index] = self.vram.get(index, 0) + size
            self.gpu_count[index] = self.gpu_count.get(index, 0) + 1


class WorkerShape(NamedTuple):
    """What a worker offers before any claim, from its inventory and reservation (the same for many passes). A tuple:
    a pool read makes one for each worker whose GPUs other processes use differently since the last."""

    ram_total: int
    gpu_total: dict[int, int]
    gpu_order: list[int]
    capacity: int
    gpu_others: dict[int, int]  # per GPU: bytes that processes outside the product hold (the worker's report)

    @classmethod
    def of(cls, status: dict, system_reserved: dict | None) -> WorkerShape:
        reserved = system_reserved or {}
        reserved_vram = int(reserved.get("vram") or 0)
        gpu_total = {int(g.get("index", n)): max(0, int((g.get("memory") or {}).get("total") or 0) - reserved_vram)
                     for n, g in enumerate(status.get("gpus") or [])}
        ram = int((status.get("memory") or {}).get("total") or 0)
        ram_total = max(0, ram - int(reserved.get("ram") or 0))
        others = {int(g.get("index", n)): int((g.get("memory") or {}).get("used_by_others") or 0)
                  for n, g in enumerate(status.get("gpus") or [])}
        return cls(ram_total, gpu_total, sorted(gpu_total), ram_total + sum(gpu_total.values()),
                   {i: size for i, size in others.items() if size > 0})


def worker_resources(worker: Worker, shape: WorkerShape, placed: ClaimTotals | None,
                     heartbeat_fresh: bool) -> WorkerResources:
    """The worker's shape less its placed claims, added up (the same sums as booking them one by one), and less what
    other processes hold on its GPUs."""
    others = shape.gpu_others
    gpu_free = {i: total - others.get(i, 0) for i, total in shape.gpu_total.items()} if others \
        else shape.gpu_total.copy()
    gpu_instance_count = dict.fromkeys(gpu_free, 0)
    # gpu_total, gpu_order and gpu_others are the shape's own, shared: read them, never change them
    res = WorkerResources(worker, ram_total=shape.ram_total, ram_free=shape.ram_total, gpu_total=shape.gpu_total,
                          gpu_free=gpu_free, gpu_instance_count=gpu_instance_count, heartbeat_fresh=heartbeat_fresh,
                          gpu_order=shape.gpu_order, capacity=shape.capacity, gpu_others=others)
    if placed is not None:
        res.instance_count = placed.count
        res.ram_free -= placed.ram
        res.booked = placed.ram
        for index, size in placed.vram.items():
            if index in gpu_free:
                gpu_free[index] -= size
                gpu_instance_count[index] = placed.gpu_count[index]
                res.booked += size
    return res
