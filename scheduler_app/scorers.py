"""Placement scorers: spread favours the emptiest worker/GPU, binpack the fullest that still fits.

A score is a sort key (lower is better) that depends only on the candidate's own worker, so the
scheduler can keep candidates in a heap and re-score just the worker a placement changed.
"""

from __future__ import annotations

from models_app.choices import PlacementStrategyChoices
from scheduler_app.selectors.common import Candidate

BINPACK = PlacementStrategyChoices.BINPACK


def score(c: Candidate, strategy: str) -> tuple:
    """The selector's preference first (fewest GPUs, most layers on GPU), then the strategy's. Written out flat: the
    first placement of a pass scores a candidate per GPU of the cluster."""
    res, gpus = c.resources, c.gpu_indexes
    if not gpus:
        placed = res.instance_count
    elif len(gpus) == 1:
        placed = res.gpu_instance_count.get(gpus[0], 0)
    else:
        placed = sum(res.gpu_instance_count.get(i, 0) for i in gpus)
    used = res.used_fraction()
    tie_break = (res.worker.name, tuple(gpus))  # deterministic: same cluster, same answer
    if strategy == BINPACK:
        return c.preference, -placed, -used, tie_break
    return c.preference, placed, used, tie_break


def best_candidate(candidates: list[Candidate], strategy: str) -> Candidate:
    return min(candidates, key=lambda c: score(c, strategy))
