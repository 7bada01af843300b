"""Placement scorers: spread favours the emptiest worker/GPU, binpack the fullest that still fits.

A score is a sort key (lower is better) that depends only on the candidate's own worker, so the
scheduler can keep candidates in a heap and re-score just the worker a placement changed.
"""

from __future__ import annotations

from itertools import repeat
from operator import neg
from typing import TYPE_CHECKING

from models_app.choices import PlacementStrategyChoices

if TYPE_CHECKING:  # the one-GPU selectors use best_gpu: no import of the selectors here
    from scheduler_app.resources import WorkerResources
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


def best_gpu(res: WorkerResources, gpus: list[int], strategy: str) -> int:
    """Of these GPUs of one worker, the one whose one-GPU placement `score` ranks first: the same preference and used
    share for all, so the fewest instances on it (spread) or the most (binpack), then the lowest index. A one-GPU
    selector offers only this one per worker: the others could never come before it, and once a placement changes
    the worker, its candidates are offered afresh."""
    placed = map(res.gpu_instance_count.get, gpus, repeat(0))  # a worker of 8 GPUs, a thousand workers: no lambda
    return min(zip(map(neg, placed) if strategy == BINPACK else placed, gpus, strict=True))[1]


def best_candidate(candidates: list[Candidate], strategy: str) -> Candidate:
    return min(candidates, key=lambda c: score(c, strategy))


def display_score(c: Candidate, strategy: str) -> float:
    """The strategy's score as people read it, 0–100 and higher is better: spread the worker's free share, binpack
    its used share (before this placement)."""
    used = c.resources.used_fraction()
    return round(100 * (used if strategy == BINPACK else 1 - used), 1)


def shown_score(key: tuple, strategy: str) -> float:
    """display_score, from the candidate's `score`."""
    return round(100 * (-key[2] if strategy == BINPACK else 1 - key[2]), 1)


def _placed(key: tuple, strategy: str) -> int:
    """How many instances the candidate's GPUs (or worker) hold, from its `score`."""
    return -key[1] if strategy == BINPACK else key[1]


def reason_key(theirs: tuple, other: Candidate) -> tuple:
    """All that why_not and shown_score read of another candidate (the chosen being the same): its score but for the
    tie-break, its GPU count and its layers on GPU. Candidates alike in these lose for the same words."""
    return theirs[:3], len(other.gpu_indexes), other.offload_layers


def why_not(chosen: Candidate, other: Candidate, strategy: str, mine: tuple | None = None,
            theirs: tuple | None = None) -> str:
    """Why `other`, which could have taken the instance, lost to `chosen`: the first rule that told them apart.
    `mine`, `theirs`: their scores, when already known."""
    mine, theirs = mine or score(chosen, strategy), theirs or score(other, strategy)
    if mine[0] != theirs[0]:
        if len(other.gpu_indexes) != len(chosen.gpu_indexes):
            return f"fits on {len(other.gpu_indexes)} GPUs, the chosen on {len(chosen.gpu_indexes)}"
        if other.offload_layers != chosen.offload_layers:
            return f"puts {other.offload_layers} layers on GPU, the chosen {chosen.offload_layers}"
        return "its placement comes later in the selector's order"
    if mine[1] != theirs[1]:
        where = "on that GPU" if len(other.gpu_indexes) == 1 else "there"
        return (f"already runs {_placed(theirs, strategy)} instance(s) {where}, the chosen {_placed(mine, strategy)} "
                f"({'spread prefers fewer' if strategy != BINPACK else 'binpack prefers more'})")
    if mine[2] != theirs[2]:
        return f"lower score: {shown_score(theirs, strategy)} vs {shown_score(mine, strategy)} ({strategy})"
    return f"same score ({shown_score(theirs, strategy)}); the chosen comes first by name"
