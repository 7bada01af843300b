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


def display_score(c: Candidate, strategy: str) -> float:
    """The strategy's score as people read it, 0–100 and higher is better: spread the worker's free share, binpack
    its used share (before this placement)."""
    used = c.resources.used_fraction()
    return round(100 * (used if strategy == BINPACK else 1 - used), 1)


def _placed_there(c: Candidate) -> int:
    return score(c, "spread")[1]


def why_not(chosen: Candidate, other: Candidate, strategy: str) -> str:
    """Why `other`, which could have taken the instance, lost to `chosen`: the first rule that told them apart."""
    mine, theirs = score(chosen, strategy), score(other, strategy)
    if mine[0] != theirs[0]:
        if len(other.gpu_indexes) != len(chosen.gpu_indexes):
            return f"fits on {len(other.gpu_indexes)} GPUs, the chosen on {len(chosen.gpu_indexes)}"
        if other.offload_layers != chosen.offload_layers:
            return f"puts {other.offload_layers} layers on GPU, the chosen {chosen.offload_layers}"
        return "its placement comes later in the selector's order"
    if mine[1] != theirs[1]:
        where = "on that GPU" if len(other.gpu_indexes) == 1 else "there"
        return (f"already runs {_placed_there(other)} instance(s) {where}, the chosen {_placed_there(chosen)} "
                f"({'spread prefers fewer' if strategy != BINPACK else 'binpack prefers more'})")
    if mine[2] != theirs[2]:
        return f"lower score: {display_score(other, strategy)} vs {display_score(chosen, strategy)} ({strategy})"
    return f"same score ({display_score(other, strategy)}); the chosen comes first by name"
