"""One scheduler pass over a locked snapshot of the cluster: filter once per model, score candidates once,
and after each placement re-score only the worker it changed.

Candidates sit in a heap per model; a placement bumps its worker's version, which makes that worker's
older heap entries stale (skipped when popped) and pushes its fresh candidates. Selectors whose choice
depends on the whole pool ("fewest GPUs", "most layers") are recomputed in full instead.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field

from models_app.models import Model
from scheduler_app.estimate import ModelEstimate
from scheduler_app.filters import filter_workers
from scheduler_app.resources import WorkerResources
from scheduler_app.scorers import score
from scheduler_app.selectors import Candidate, Reasons, Selector, is_per_worker, select_candidates
from workers_app.models import Worker


@dataclass
class PlacementResult:
    candidate: Candidate | None
    reasons: Reasons
    note: str = ""

    @property
    def message(self) -> str:
        if self.candidate is not None:
            return self.note
        if not self.reasons:
            return "no workers have registered yet"
        return "no worker fits: " + self.reasons.render() + (f" ({self.note})" if self.note else "")


@dataclass
class _ModelState:
    model: Model
    est: ModelEstimate
    kept: list[WorkerResources]
    filter_reasons: Reasons
    reasons: Reasons = field(default_factory=Reasons)
    stage: Selector | None = None
    heap: list = field(default_factory=list)
    fresh: bool = False  # False: recompute the whole pipeline before the next placement


class PlacementSession:
    def __init__(self, workers: list[Worker], pool: dict[int, WorkerResources]):
        self.workers = workers
        self.pool = pool
        self.versions: dict[int, int] = dict.fromkeys(pool, 0)
        self.states: dict[int | None, _ModelState] = {}
        self.counter = itertools.count()

    def _state(self, model: Model, est: ModelEstimate) -> _ModelState:
        key = model.pk
        state = self.states.get(key) if key is not None else None
        if state is None:
            reasons = Reasons()
            kept = [self.pool[w.id] for w in filter_workers(model, self.workers, reasons, est.backend)]
            state = _ModelState(model, est, kept, reasons)
            if key is not None:
                self.states[key] = state
        return state

    def _push(self, state: _ModelState, candidates: list[Candidate]) -> None:
        strategy = state.model.placement_strategy
        for c in candidates:
            worker_id = c.resources.worker.id
            heapq.heappush(state.heap, (score(c, strategy), next(self.counter), worker_id,
                                        self.versions[worker_id], c))

    def _recompute(self, state: _ModelState) -> None:
        state.reasons = state.filter_reasons.copy()
        state.stage, found = select_candidates(state.model, state.est, state.kept, state.reasons) \
            if state.kept else (None, [])
        state.heap = []
        self._push(state, found)
        state.fresh = True

    def _pop(self, state: _ModelState) -> Candidate | None:
        while state.heap:
            _, _, worker_id, version, candidate = heapq.heappop(state.heap)
            if version == self.versions[worker_id]:
                return candidate
        return None

    def place(self, model: Model, est: ModelEstimate) -> PlacementResult:
        state = self._state(model, est)
        if not state.fresh:
            self._recompute(state)
        candidate = self._pop(state)
        if candidate is None and is_per_worker(state.stage):
            self._recompute(state)  # this stage ran dry: a later selector may still yield
            candidate = self._pop(state)
        return PlacementResult(candidate, state.reasons, est.note)

    def book(self, candidate: Candidate) -> None:
        """Take the claims off the main worker and each subordinate's worker; every worker touched goes stale."""
        candidate.resources.book(candidate.claim)
        for subordinate in candidate.subordinates:
            subordinate.resources.book(subordinate.claim)
        touched = {id(r): r for r in [candidate.resources, *(s.resources for s in candidate.subordinates)]}
        for res in touched.values():
            self.versions[res.worker.id] += 1
        for state in self.states.values():
            if not state.fresh:
                continue
            if not is_per_worker(state.stage):
                state.fresh = False
                continue
            for res in touched.values():
                if any(r is res for r in state.kept):
                    self._push(state, state.stage(state.model, state.est, [res], Reasons()))
