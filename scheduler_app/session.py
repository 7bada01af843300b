"""One scheduler pass over a locked snapshot of the cluster: filter once per model, score candidates once,
and after each placement re-score only the worker it changed.

Candidates sit in a heap per model; a placement bumps its worker's version, which makes that worker's
older heap entries stale (skipped when popped) and pushes its fresh candidates. A choice across the pool
("fewest GPUs", "most layers") is part of each candidate's sort key, so those selectors work per worker too;
only selectors that combine workers (placements across workers) are recomputed in full. Should a worker a
placement changed now suit a selector earlier in the pipeline, the whole pipeline runs again: the pass
decides as a fresh look after every placement would.

Why here: each placement, and each instance left waiting, explains itself against the whole pool. Every other
worker is accounted for: it runs part of the chosen placement, could have taken it but scored lower, did not fit
(with numbers), or was filtered out (state, labels, backend, gpu_selector). The first EXPLAINED_OTHERS are named in
that order, each with its reason; the rest are counted in groups by reason, with a few names each. A pass keeps, per
model, which workers have candidates and why the others have none, updating only the workers a placement changed,
so an explanation costs the names it gives, not the size of the cluster.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import re
from dataclasses import dataclass, field

from models_app.models import Model
from scheduler_app.estimate import ModelEstimate
from scheduler_app.filters import filter_workers
from scheduler_app.resources import WorkerResources
from scheduler_app.scorers import display_score, reason_key, score, shown_score, why_not
from scheduler_app.selectors import Candidate, Reasons, Selector, is_per_worker, pipeline, select_candidates
from scheduler_app.selectors.common import ACROSS_WORKERS

# Other workers named in an explanation, best first; the rest are counted in groups by reason. Every placement of a
# pass stores its names (about 130 bytes of JSON each): at 1,000 workers on SQLite a spread pass placed about 13 %
# fewer a second with 16 or 32 names than with 3 (mostly writing the rows), and 50 cost more again.
EXPLAINED_OTHERS = 32
EXAMPLES = 3  # names given with each group
MOST_GROUPS = 10  # groups of one kind; past them, the smallest are counted together as "other reasons"
LOOKED_AT = 8 * (EXPLAINED_OTHERS + EXAMPLES)  # heap entries read, at most, for the workers that scored lower

# Why another worker lost, in the order an explanation names them.
TAKES_PART, LOWER_SCORE, DID_NOT_FIT, FILTERED = "takes_part", "lower_score", "did_not_fit", "filtered"
_FIGURES = re.compile(r"\d+(?:\.\d+)?")  # reasons alike but for their figures share a group


def _no_candidate(stage: Selector | None) -> str:
    """The reason of a worker the selectors passed over without a word (say, one without GPUs while a GPU selector
    placed it)."""
    if stage is None:
        return "no selector offered a placement there"
    return f"no placement there of the kind chosen ({stage.__name__})"


class Losers:
    """The workers of one kind of loss (did not fit, filtered), in the order found, each with its reason, and grouped
    by reason alike but for its figures. Kept up to date as workers come and go, so that explaining costs the names
    given and the number of groups, not the number of workers."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.reasons: dict[str, str] = {}
        self.groups: dict[str, dict[str, None]] = {}  # reason with its figures masked → its workers, in order
        self.exact: dict[str, dict[str, int]] = {}  # reason with its figures masked → each exact reason's count

    def set(self, name: str, reason: str) -> None:
        old = self.reasons.get(name)
        if old == reason:
            return
        if old is not None:
            self._ungroup(name, old)
        self.reasons[name] = reason
        key = _FIGURES.sub("#", reason)
        self.groups.setdefault(key, {})[name] = None
        exact = self.exact.setdefault(key, {})
        exact[reason] = exact.get(reason, 0) + 1

    def drop(self, name: str) -> None:
        old = self.reasons.pop(name, None)
        if old is not None:
            self._ungroup(name, old)

    def _ungroup(self, name: str, reason: str) -> None:
        key = _FIGURES.sub("#", reason)
        members, exact = self.groups[key], self.exact[key]
        del members[name]
        exact[reason] -= 1
        if not exact[reason]:
            del exact[reason]
        if not members:
            del self.groups[key], self.exact[key]

    def explain(self, others: list[dict], room: int, skip: set[str]) -> list[dict]:
        """Name up to `room` of these workers (not those in `skip`) into `others`; the groups of the rest."""
        named: set[str] = set()
        if room > 0:
            for name, reason in self.reasons.items():
                if name in skip:
                    continue
                others.append({"worker_name": name, "kind": self.kind, "reason": reason})
                named.add(name)
                if len(named) >= room:
                    break
        left_out = named | {name for name in skip if name in self.reasons}
        minus: dict[str, int] = {}
        for name in left_out:
            key = _FIGURES.sub("#", self.reasons[name])
            minus[key] = minus.get(key, 0) + 1
        groups = []
        for key, members in self.groups.items():
            count = len(members) - minus.get(key, 0)
            if count <= 0:
                continue
            examples = list(itertools.islice((n for n in members if n not in left_out), EXAMPLES))
            groups.append({"kind": self.kind, "reason": self.reasons[examples[0]], "count": count,
                           "examples": examples, "figures_differ": len(self.exact[key]) > 1})
        if len(groups) > MOST_GROUPS:  # reasons of every sort (say, a worker's own words): the largest, then the rest
            groups.sort(key=lambda g: -g["count"])
            rest = groups[MOST_GROUPS - 1:]
            groups = groups[:MOST_GROUPS - 1] + [{
                "kind": self.kind, "reason": "other reasons", "count": sum(g["count"] for g in rest),
                "examples": [name for g in rest for name in g["examples"]][:EXAMPLES], "figures_differ": True}]
        return groups


def filtered_out(pool: list[WorkerResources], kept_ids: set[int], filter_reasons: Reasons) -> Losers:
    """The workers the filters left out, each with why (a worker that gpu_selector does not name has no reason of
    its own), and any name gpu_selector gives that no worker has."""
    filtered = Losers(FILTERED)
    for res in pool:
        if res.worker.id not in kept_ids:
            reasons = filter_reasons.by_worker.get(res.worker.name)
            filtered.set(res.worker.name, "; ".join(reasons) if reasons else "not picked by gpu_selector")
    for name, reasons in filter_reasons.by_worker.items():
        if name not in filtered.reasons:
            filtered.set(name, "; ".join(reasons))
    return filtered


def did_not_fit(kept: list[WorkerResources], fitting: set[int] | dict[int, object], reasons: Reasons,
                stage: Selector | None) -> Losers:
    """The workers the filters kept but no selector placed it on, each with the selectors' reasons."""
    unfit = Losers(DID_NOT_FIT)
    for res in kept:
        if res.worker.id not in fitting:
            said = reasons.by_worker.get(res.worker.name)
            unfit.set(res.worker.name, "; ".join(said) if said else _no_candidate(stage))
    return unfit


@dataclass
class PlacementResult:
    candidate: Candidate | None
    reasons: Reasons
    note: str = ""
    ranked: list[tuple[tuple, Candidate]] = field(default_factory=list)  # other workers' best, with scores (some)
    strategy: str = ""
    lower_count: int = 0  # other workers that could have taken it (not those running part of it)
    losers: tuple[Losers, ...] = ()  # the workers that could not: did not fit, filtered

    def explanation(self) -> dict:
        """Why here (`placement_explanation`), as the pass stands now (ask before booking the placement): the chosen
        worker and GPUs with their score, then every other worker with why it lost, the first EXPLAINED_OTHERS by
        name (`others`: running part of it, a lower score with the rule that decided, did not fit with numbers,
        filtered out), the rest counted in groups by reason (`others_grouped`), so that `others_count` is the
        number named plus every group's count. `across_workers`: why no placement across workers was found."""
        chosen, others, groups = self.candidate, [], []
        parts = [] if chosen is None else list(dict.fromkeys(
            s.resources.worker.name for s in chosen.subordinates if s.resources is not chosen.resources))
        skip = set(parts) if chosen is None else {chosen.worker_name, *parts}
        for name in parts:
            others.append({"worker_name": name, "kind": TAKES_PART,
                           "reason": "runs part of the chosen placement (across workers)"})
        room = max(0, EXPLAINED_OTHERS - len(others))
        lower, strategy = self.ranked[:room], self.strategy
        mine, said = None if chosen is None else score(chosen, strategy), {}
        for theirs, other in lower:  # many lose alike: the words once for each sort (scorers.reason_key)
            alike = reason_key(theirs, other)
            words = said.get(alike)
            if words is None:
                words = said[alike] = (shown_score(theirs, strategy), why_not(chosen, other, strategy, mine, theirs))
            others.append({"worker_name": other.resources.worker.name, "kind": LOWER_SCORE, "score": words[0],
                           "reason": words[1]})
        room -= len(lower)
        if self.lower_count > len(lower):
            groups.append({"kind": LOWER_SCORE, "count": self.lower_count - len(lower),
                           "reason": f"could take it, but ranks below the chosen ({self.strategy})",
                           "examples": [c.worker_name for _, c in self.ranked[len(lower):len(lower) + EXAMPLES]],
                           "figures_differ": False})
        for losers in self.losers:
            named_before = len(others)
            groups += losers.explain(others, room, skip)
            room -= len(others) - named_before
        explained = {
            "strategy": self.strategy,
            "chosen": None if chosen is None else {"worker_name": chosen.worker_name,
                                                   "gpu_indexes": list(chosen.gpu_indexes),
                                                   "score": display_score(chosen, self.strategy)},
            "others": others,
            "others_grouped": groups,
            "others_count": len(others) + sum(g["count"] for g in groups),
        }
        across_reasons = self.reasons.by_worker.get(ACROSS_WORKERS)  # a story about a group of workers, not one
        if across_reasons:
            explained["across_workers"] = "; ".join(across_reasons)
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
    filtered: Losers
    reasons: Reasons = field(default_factory=Reasons)
    stage: Selector | None = None
    heap: list = field(default_factory=list)
    fresh: bool = False  # False: recompute the whole pipeline before the next placement
    fitting: set[int] = field(default_factory=set)  # the workers with a candidate in the heap
    unfit: Losers = field(default_factory=lambda: Losers(DID_NOT_FIT))  # the kept workers without one, and why
    top: list | None = None  # the heap's smallest live entries, in order (None: read them off the heap again)


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
            kept_ids = {res.worker.id for res in kept}
            state = _ModelState(model, est, kept, kept_ids, reasons, filtered_out(self.pool, kept_ids, reasons))
            if key is not None:
                self.states[key] = state
        return state

    def _entries(self, state: _ModelState, candidates: list[Candidate]) -> list[tuple]:
        strategy, versions, counter = state.model.placement_strategy, self.versions, self.counter
        return [(score(c, strategy), next(counter), c.resources.worker.id, versions[c.resources.worker.id], c)
                for c in candidates]

    def _push(self, state: _ModelState, candidates: list[Candidate]) -> None:
        top = state.top
        for entry in self._entries(state, candidates):
            heapq.heappush(state.heap, entry)
            if top and entry < top[-1]:  # among the smallest: the live entries not in `top` stay above its last
                bisect.insort(top, entry)

    def _recompute(self, state: _ModelState) -> None:
        state.reasons = state.filter_reasons.copy()
        state.stage, found = select_candidates(state.model, state.est, state.kept, state.reasons) \
            if state.kept else (None, [])
        state.heap = self._entries(state, found)
        heapq.heapify(state.heap)
        state.fitting = {c.resources.worker.id for c in found}
        state.unfit = did_not_fit(state.kept, state.fitting, state.reasons, state.stage)
        state.top = None
        state.fresh = True

    def _pop(self, state: _ModelState) -> Candidate | None:
        while state.heap:
            entry = heapq.heappop(state.heap)
            _, _, worker_id, version, candidate = entry
            if version == self.versions[worker_id]:
                if state.top and state.top[0] is entry:
                    del state.top[0]
                else:
                    state.top = None
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
        skip = _taking_part(candidate)
        lower_count = len(state.fitting) - sum(worker_id in state.fitting for worker_id in skip)
        return PlacementResult(candidate, state.reasons, est.note, self._ranked(state, skip),
                               model.placement_strategy, lower_count if candidate else 0, (state.unfit, state.filtered))

    def _ranked(self, state: _ModelState, skip: set[int]) -> list[tuple[tuple, Candidate]]:
        """The best candidates on the other workers (not those in `skip`), one per worker, best first, with their
        scores, enough to name and to give examples. They come from `state.top`, the heap's smallest live entries in
        order, kept from one placement to the next (the placement's entry leaves it, a changed worker's go, its new
        ones come in when small enough); when it runs short it is read off the heap again."""
        if not skip or not state.heap:
            return []
        wanted = EXPLAINED_OTHERS + EXAMPLES
        if state.top is None or len(state.top) < wanted + len(skip):
            state.top = self._smallest(state, 2 * wanted + len(skip))
        seen, found = set(skip), []
        for key, _, worker_id, _, candidate in state.top:
            if worker_id not in seen:
                seen.add(worker_id)
                found.append((key, candidate))
                if len(found) >= wanted:
                    break
        return found

    def _smallest(self, state: _ModelState, most: int) -> list:
        """The heap's smallest live entries, in order, up to `most`, read without changing it: a small heap of
        positions walks the big one from its root (a parent is never worse than its children), skipping stale
        entries, LOOKED_AT at most (what it found is still the smallest, in order)."""
        heap, versions = state.heap, self.versions
        found, frontier, looked = [], [(heap[0], 0)], 0
        while frontier and len(found) < most and looked < LOOKED_AT:
            entry, at = heapq.heappop(frontier)
            looked += 1
            if entry[3] == versions[entry[2]]:
                found.append(entry)
            for child in (2 * at + 1, 2 * at + 2):
                if child < len(heap):
                    heapq.heappush(frontier, (heap[child], child))
        return found

    def best(self, model: Model, est: ModelEstimate) -> PlacementResult:
        """A dry run (evaluations): the candidate `place` would pop first, without the heap kept for the placements
        after it. The pipeline's first stage with candidates, the lowest score (the first of equals)."""
        filter_reasons = Reasons()
        kept = filter_workers(model, self.pool, filter_reasons, est.backend)
        kept_ids = {res.worker.id for res in kept}
        reasons = filter_reasons.copy()
        stage, found = select_candidates(model, est, kept, reasons) if kept else (None, [])
        strategy = model.placement_strategy
        best_of: dict[int, tuple[tuple, Candidate]] = {}  # each worker's best candidate (the first of equals)
        for candidate in found:
            worker_id, key = candidate.resources.worker.id, score(candidate, strategy)
            kept_best = best_of.get(worker_id)
            if kept_best is None or key < kept_best[0]:
                best_of[worker_id] = (key, candidate)
        chosen = min(best_of.values(), key=_first)[1] if best_of else None
        skip = _taking_part(chosen)
        ranked = [(key, candidate) for key, candidate in heapq.nsmallest(
            EXPLAINED_OTHERS + EXAMPLES + len(skip), best_of.values(), key=_first)
            if candidate.resources.worker.id not in skip][:EXPLAINED_OTHERS + EXAMPLES]
        return PlacementResult(chosen, reasons, est.note, ranked, strategy, len(best_of.keys() - skip) if chosen else 0,
                               (did_not_fit(kept, best_of, reasons, stage),
                                filtered_out(self.pool, kept_ids, filter_reasons)))

    def book(self, candidate: Candidate) -> None:
        """Take the claims off the main worker and each subordinate's worker; every worker touched goes stale."""
        candidate.resources.book(candidate.claim)
        for subordinate in candidate.subordinates:
            subordinate.resources.book(subordinate.claim)
        touched = {id(r): r for r in [candidate.resources, *(s.resources for s in candidate.subordinates)]}
        for res in touched.values():
            self.versions[res.worker.id] += 1
        gone = {res.worker.id for res in touched.values()}
        for state in self.states.values():
            if state.top:  # their entries are stale now
                state.top = [entry for entry in state.top if entry[2] not in gone]
        for state in self.states.values():
            if not state.fresh:
                continue
            if not is_per_worker(state.stage):
                state.fresh = False
                continue
            for res in touched.values():
                if res.worker.id not in state.kept_ids:
                    continue
                reasons = Reasons()
                if self._earlier_stage_yields(state, res, reasons):
                    state.fresh = False
                    break
                found = state.stage(state.model, state.est, [res], reasons)
                self._push(state, found)
                worker = res.worker
                if found:
                    state.fitting.add(worker.id)
                    state.unfit.drop(worker.name)
                else:  # full now: why, as a fresh look would say it
                    state.fitting.discard(worker.id)
                    said = reasons.by_worker.get(worker.name)
                    state.unfit.set(worker.name, "; ".join(said) if said else _no_candidate(state.stage))

    @staticmethod
    def _earlier_stage_yields(state: _ModelState, res: WorkerResources, reasons: Reasons) -> bool:
        """Whether a per-worker selector before this stage now has a candidate on this worker (the pipeline's first
        yielding selector would change); the reasons of those that have none go into `reasons`. Selectors that
        combine workers come first only for GPUs picked on several workers, when the one-worker selectors yield
        nothing."""
        for selector in pipeline(state.est.backend):
            if selector is state.stage:
                return False
            if is_per_worker(selector) and selector(state.model, state.est, [res], reasons):
                return True
        return False


def _first(entry: tuple) -> tuple:
    return entry[0]


def _taking_part(candidate: Candidate | None) -> set[int]:
    """The workers of a placement: its main's, and those of its parts on other workers."""
    if candidate is None:
        return set()
    return {candidate.resources.worker.id, *(s.resources.worker.id for s in candidate.subordinates)}
