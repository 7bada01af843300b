"""Placement scorers: spread favours the emptiest worker/GPU, binpack the fullest that still fits."""

from __future__ import annotations

from models_app.choices import PlacementStrategyChoices
from scheduler_app.selectors import Candidate


def _load(c: Candidate) -> tuple[int, float]:
    gpu_count = sum(c.resources.gpu_instance_count.get(i, 0) for i in c.gpu_indexes)
    return (gpu_count if c.gpu_indexes else c.resources.instance_count), c.resources.used_fraction()


def best_candidate(candidates: list[Candidate], strategy: str) -> Candidate:
    def tie_break(c: Candidate) -> tuple:
        return c.worker_name, c.gpu_indexes

    if strategy == PlacementStrategyChoices.BINPACK:
        return min(candidates, key=lambda c: (tuple(-x for x in _load(c)), tie_break(c)))
    return min(candidates, key=lambda c: (_load(c), tie_break(c)))
