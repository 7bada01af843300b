"""Candidate selectors per backend, tried in order; the first that yields candidates wins. Each backend module
names its pipeline (`Backend.selectors`), so a new backend brings its own."""

from __future__ import annotations

from functools import cache

from django.utils.module_loading import import_string

from models_app.models import Model
from scheduler_app.estimate import ModelEstimate
from scheduler_app.resources import WorkerResources
from scheduler_app.selectors.common import Candidate, Reasons, Selector
from workers_app.backends import get_backend


@cache
def pipeline(backend: str) -> list[Selector]:
    return list(import_string(get_backend(backend).selectors))


def select_candidates(model: Model, est: ModelEstimate, pool: list[WorkerResources],
                      reasons: Reasons) -> tuple[Selector | None, list[Candidate]]:
    """The first selector that yields candidates, and its candidates."""
    for selector in pipeline(est.backend):
        found = selector(model, est, pool, reasons)
        if found:
            return selector, found
    return None, []


def is_per_worker(selector: Selector | None) -> bool:
    """True when a worker's candidates do not depend on the other workers (no "fewest"/"most" across the pool)."""
    return getattr(selector, "per_worker", False)


__all__ = ["Candidate", "Reasons", "Selector", "is_per_worker", "pipeline", "select_candidates"]
