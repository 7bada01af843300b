"""Placement scorers: spread favours the emptiest worker/GPU, binpack the fullest that still fits.

A score is a sort key (lower is better) that depends only on the candidate's own worker, so the
scheduler can keep candidates in a heap and re-score just the worker a placement changed.
"""

from __future__ import annotations

from models_app.choices import PlacementStrategyChoices
from scheduler_app.selectors.common import Candidate


def _load(c: Candidate) -> tuple[int, float]:
    res = c.resources
    placed = sum(res.gpu_instance_count.get(i, 0) for i in c.gpu_indexes) if c.gpu_indexes else res.instance_count
    return placed, res.used_fraction()


def score(c: Candidate, strategy: str) -> tuple:
    placed, used = _load(c)
    tie_break = (c.worker_name, tuple(c.gpu_indexes))  # deterministic: same cluster, same answer
    if strategy == PlacementStrategyChoices.BINPACK:
        return -placed, -used, tie_break
    return placed, used, tie_break


def best_candidate(candidates: list[Candidate], strategy: str) -> Candidate:
    return min(candidates, key=lambda c: score(c, strategy))
