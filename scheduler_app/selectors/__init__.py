"""Candidate selectors per backend, tried in order; the first that yields candidates wins."""

from __future__ import annotations

from models_app.choices import BackendChoices
from models_app.models import Model
from scheduler_app.estimate import ModelEstimate
from scheduler_app.resources import WorkerResources
from scheduler_app.selectors import llama_box, vllm, vox_box
from scheduler_app.selectors.common import Candidate, Reasons, Selector

PIPELINES: dict[str, list[Selector]] = {
    BackendChoices.LLAMA_BOX: llama_box.SELECTORS,
    BackendChoices.VLLM: vllm.SELECTORS,
    BackendChoices.VOX_BOX: vox_box.SELECTORS,
}


def select_candidates(model: Model, est: ModelEstimate, pool: list[WorkerResources],
                      reasons: Reasons) -> tuple[Selector | None, list[Candidate]]:
    """The first selector that yields candidates, and its candidates."""
    for selector in PIPELINES.get(est.backend, llama_box.SELECTORS):
        found = selector(model, est, pool, reasons)
        if found:
            return selector, found
    return None, []


def is_per_worker(selector: Selector | None) -> bool:
    """True when a worker's candidates do not depend on the other workers (no "fewest"/"most" across the pool)."""
    return getattr(selector, "per_worker", False)


__all__ = ["Candidate", "Reasons", "Selector", "is_per_worker", "select_candidates"]
