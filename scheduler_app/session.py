"""One scheduler pass over a locked snapshot of the cluster: filter once per model, score candidates once,
and after each placement re-score only the worker it changed.

Candidates sit in a heap per model; a placement bumps its worker's version, which makes that worker's
older heap entries stale (skipped when popped) and pushes its fresh candidates. A choice across the pool
("fewest GPUs", "most layers") is part of each candidate's sort key, so those selectors work per worker too;
only selectors that combine workers (placements across workers) are recomputed in full. Should a worker a
placement changed now suit a selector earlier in the pipeline, the whole pipeline runs again: the pass
decides as a fresh look after every placement would.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field

from models_app.models import Model
from scheduler_app.estimate import ModelEstimate
from scheduler_app.filters import filter_workers
from scheduler_app.resources import WorkerResources
from scheduler_app.scorers import display_score, score, why_not
from scheduler_app.selectors import Candidate, Reasons, Selector, is_per_worker, pipeline, select_candidates
from scheduler_app.selectors.common import ACROSS_WORKERS

EXPLAINED_OTHERS = 10  # workers named in an explanation; the others are counted
RUNNERS_UP = 3  # of them, the best placements on other workers (each costs heap work in a pass)


@dataclass
class PlacementResult:
    candidate: Candidate | None
    reasons: Reasons
    note: str = ""
    runners_up: list[Candidate] = field(default_factory=list)  # the best placements on other workers, best first
    strategy: str = ""
    workers: int = 0  # in the pool

    def explanation(self) -> dict:
        """Why here (`placement_explanation`): the chosen worker and GPUs with their score, and for other workers why
        they lost: a lower score (the runners-up), or why they could not take it at all (with numbers)."""
        chosen, others, across = self.candidate, [], None
        for other in self.runners_up:
            others.append({"worker_name": other.worker_name, "reason": why_not(chosen, other, self.strategy)})
        across_reasons = self.reasons.by_worker.get(ACROSS_WORKERS)  # a story about a group of workers, not one
        if across_reasons:
            across = "; ".join(across_reasons)
        for name, reasons in self.reasons.by_worker.items():
            if len(others) >= EXPLAINED_OTHERS:
                break
            if name != ACROSS_WORKERS and (chosen is None or name != chosen.worker_name):
                others.append({"worker_name": name, "reason": "; ".join(reasons)})
        explained = {
            "strategy": self.strategy,
            "chosen": None if chosen is None else {"worker_name": chosen.worker_name,
                                                   "gpu_indexes": list(chosen.gpu_indexes),
                                                   "score": display_score(chosen, self.strategy)},
            "others": others,
            "others_count": max(self.workers - (chosen is not None), len(others)),
        }
        if across:
            explained["across_workers"] = across
        return explained

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
    kept_ids: set[int]
    filter_reasons: Reasons
    reasons: Reasons = field(default_factory=Reasons)
    stage: Selector | None = None
    heap: list = field(default_factory=list)
    fresh: bool = False  # False: recompute the whole pipeline before the next placement


class PlacementSession:
    def __init__(self, pool: list[WorkerResources]):
        self.pool = pool
        self.versions: dict[int, int] = {res.worker.id: 0 for res in pool}
        self.states: dict[int | None, _ModelState] = {}
        self.counter = itertools.count()

    def _state(self, model: Model, est: ModelEstimate) -> _ModelState:
        key = model.pk
        state = self.states.get(key) if key is not None else None
        if state is None:
            reasons = Reasons()
            kept = filter_workers(model, self.pool, reasons, est.backend)
            state = _ModelState(model, est, kept, {res.worker.id for res in kept}, reasons)
            if key is not None:
                self.states[key] = state
        return state

    def _entries(self, state: _ModelState, candidates: list[Candidate]) -> list[tuple]:
        strategy, versions, counter = state.model.placement_strategy, self.versions, self.counter
        return [(score(c, strategy), next(counter), c.resources.worker.id, versions[c.resources.worker.id], c)
                for c in candidates]

    def _push(self, state: _ModelState, candidates: list[Candidate]) -> None:
        for entry in self._entries(state, candidates):
            heapq.heappush(state.heap, entry)

    def _recompute(self, state: _ModelState) -> None:
        state.reasons = state.filter_reasons.copy()
        state.stage, found = select_candidates(state.model, state.est, state.kept, state.reasons) \
            if state.kept else (None, [])
        state.heap = self._entries(state, found)
        heapq.heapify(state.heap)
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
        return PlacementResult(candidate, state.reasons, est.note, self._runners_up(state, candidate),
                               model.placement_strategy, len(self.pool))

    def _runners_up(self, state: _ModelState, chosen: Candidate | None) -> list[Candidate]:
        """The next best candidates on other workers, one per worker, read off the heap in order without changing
        it: a small heap of positions walks the big one from its root (a parent is never worse than its children),
        skipping stale entries; at most 8 × EXPLAINED_OTHERS entries are looked at."""
        heap = state.heap
        if chosen is None or not heap:
            return []
        seen, found = {chosen.resources.worker.id}, []
        frontier = [(heap[0], 0)]
        looked = 0
        while frontier and len(found) < RUNNERS_UP and looked < 8 * EXPLAINED_OTHERS:
            (_, _, worker_id, version, candidate), at = heapq.heappop(frontier)
            looked += 1
            if version == self.versions[worker_id] and worker_id not in seen:
                seen.add(worker_id)
                found.append(candidate)
            for child in (2 * at + 1, 2 * at + 2):
                if child < len(heap):
                    heapq.heappush(frontier, (heap[child], child))
        return found

    def best(self, model: Model, est: ModelEstimate) -> PlacementResult:
        """A dry run (evaluations): the candidate `place` would pop first, without the heap kept for the placements
        after it. The pipeline's first stage with candidates, the lowest score (the first of equals)."""
        reasons = Reasons()
        kept = filter_workers(model, self.pool, reasons, est.backend)
        _, found = select_candidates(model, est, kept, reasons) if kept else (None, [])
        strategy = model.placement_strategy
        ranked = heapq.nsmallest(EXPLAINED_OTHERS * 8, found, key=lambda c: score(c, strategy))
        chosen = ranked[0] if ranked else None
        runners_up, seen = [], {chosen.resources.worker.id} if chosen else set()
        for candidate in ranked[1:]:
            if candidate.resources.worker.id not in seen and len(runners_up) < RUNNERS_UP:
                seen.add(candidate.resources.worker.id)
                runners_up.append(candidate)
        return PlacementResult(chosen, reasons, est.note, runners_up, strategy, len(self.pool))

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
                if res.worker.id not in state.kept_ids:
                    continue
                if self._earlier_stage_yields(state, res):
                    state.fresh = False
                    break
                self._push(state, state.stage(state.model, state.est, [res], Reasons()))

    @staticmethod
    def _earlier_stage_yields(state: _ModelState, res: WorkerResources) -> bool:
        """Whether a per-worker selector before this stage now has a candidate on this worker (the pipeline's first
        yielding selector would change). Selectors that combine workers come first only for GPUs picked on several
        workers, when the one-worker selectors yield nothing."""
        for selector in pipeline(state.est.backend):
            if selector is state.stage:
                return False
            if is_per_worker(selector) and selector(state.model, state.est, [res], Reasons()):
                return True
        return False
