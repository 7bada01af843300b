"""The pool: what every worker can still give, read in two queries — the workers, then the claims placed on them.

A pass reads every worker and every claim, but a worker's inventory, labels and reservation, and most claims, change
far less often than passes run. Each is parsed once per content and kept, keyed by the very text the pass read (inside
its transaction, under its locks), so a kept parse is never stale: a changed row is a different key. What changes with
every heartbeat, whether it is recent, is judged by the database in the same query.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable
from datetime import timedelta

from django.conf import settings
from django.db.models import BooleanField, ExpressionWrapper, Q, TextField
from django.db.models.functions import Cast
from django.utils import timezone

from models_app.choices import ErrorKind, InstanceState
from models_app.models import ModelInstance
from scheduler_app.resources import ClaimTotals, WorkerResources, WorkerShape, parse_claim, worker_resources
from workers_app.models import Worker

WORKER_FIELDS = ["id", "name", "labels", "system_reserved", "status", "state"]  # in the model's order (from_db)
NO_SERVERS = ("[]", "")
CLAIMS_KEPT = 10_000  # distinct claim texts kept between passes; past it the memo starts over


class _Parsed:
    """What was parsed from one content, kept between passes (never mutated once made)."""

    _workers: dict[int, tuple[tuple, tuple[dict, dict, dict], WorkerShape]] = {}
    _claims: dict[str, tuple[int, tuple[tuple[int, int], ...]]] = {}
    _servers: dict[str, list[tuple[int, tuple[int, tuple[tuple[int, int], ...]]]]] = {}

    @classmethod
    def worker(cls, worker_id: int, texts: tuple) -> tuple[tuple[dict, dict, dict], WorkerShape]:
        kept = cls._workers.get(worker_id)
        if kept is not None and kept[0] == texts:
            return kept[1], kept[2]
        labels, reserved, status = (json.loads(t) if t else {} for t in texts)
        shape = WorkerShape.of(status, reserved)
        cls._workers[worker_id] = (texts, (labels, reserved, status), shape)
        return (labels, reserved, status), shape

    @classmethod
    def forget_workers_except(cls, worker_ids: set[int]) -> None:
        if len(cls._workers) > len(worker_ids):
            kept = cls._workers.copy()  # one step: another thread's pass may be adding to it
            cls._workers = {k: v for k, v in kept.items() if k in worker_ids}

    @classmethod
    def claim(cls, text: str) -> tuple[int, tuple[tuple[int, int], ...]]:
        parsed = cls._claims.get(text)
        if parsed is None:
            if len(cls._claims) >= CLAIMS_KEPT:
                cls._claims = {}
            parsed = cls._claims[text] = parse_claim(json.loads(text) or {}) if text else (0, ())
        return parsed

    @classmethod
    def servers(cls, text: str) -> list[tuple[int, tuple[int, tuple[tuple[int, int], ...]]]]:
        parsed = cls._servers.get(text)
        if parsed is None:
            if len(cls._servers) >= CLAIMS_KEPT:
                cls._servers = {}
            parsed = cls._servers[text] = [
                (int(s["worker_id"]), parse_claim(s.get("computed_resource_claim") or {}))
                for s in json.loads(text) or [] if s.get("worker_id") is not None]
        return parsed


def claims_by_worker(exclude_instance_ids: Iterable[int] = ()) -> dict[int, ClaimTotals]:
    """The claims of every placed instance, added up per worker (one query for the whole cluster): the main's on its
    worker, each RPC server's (`distributed_servers`) on that server's worker. An instance stopped by a permanent error
    holds none: it runs nothing until it is edited or deleted."""
    excluded = set(exclude_instance_ids)
    rows = (ModelInstance.objects.filter(worker__isnull=False)
            .exclude(state=InstanceState.ERROR, error_kind=ErrorKind.PERMANENT)
            .annotate(claim_text=Cast("computed_resource_claim", TextField()),
                      servers_text=Cast("distributed_servers", TextField()))
            .values_list("pk", "worker_id", "claim_text", "servers_text"))
    totals: dict[int, ClaimTotals] = defaultdict(ClaimTotals)
    for pk, worker_id, claim_text, servers_text in rows:
        if pk in excluded:  # filtered here, not in SQL: a pass may exclude more ids than a query may carry
            continue
        totals[worker_id].add(*_Parsed.claim(claim_text))
        if servers_text not in NO_SERVERS:  # filtered here: JSONField __contains does not work on SQLite
            for server_worker_id, (ram, vram) in _Parsed.servers(servers_text):
                totals[server_worker_id].add(ram, vram)
    return totals


def read_pool(exclude_instance_ids: Iterable[int] = (), lock: bool = False) -> list[WorkerResources]:
    """Every worker, by id, with what it can still give. `lock`: take the workers' rows (in id order) first, so
    concurrent schedulers never book the same free memory twice; the claims are read after, under those locks.
    Each worker object is new, with the fields the scheduler reads (the others load when first used); its labels,
    reservation and inventory are the kept parses, shared between passes: read them, never change them."""
    cutoff = timezone.now() - timedelta(seconds=settings.WORKER_STALE_AFTER)
    rows = Worker.objects.order_by("id").annotate(
        heartbeat_fresh=ExpressionWrapper(Q(last_heartbeat_at__gt=cutoff), output_field=BooleanField()),
        labels_text=Cast("labels", TextField()), reserved_text=Cast("system_reserved", TextField()),
        status_text=Cast("status", TextField()),
    ).values_list("id", "name", "state", "heartbeat_fresh", "labels_text", "reserved_text", "status_text")
    if lock:
        rows = rows.select_for_update()
    rows = list(rows)
    placed = claims_by_worker(exclude_instance_ids)
    db = Worker.objects.db
    pool = []
    for worker_id, name, state, fresh, *texts in rows:
        (labels, reserved, status), shape = _Parsed.worker(worker_id, tuple(texts))
        worker = Worker.from_db(db, WORKER_FIELDS, (worker_id, name, labels, reserved, status, state))
        pool.append(worker_resources(worker, shape, placed.get(worker_id), bool(fresh)))
    _Parsed.forget_workers_except({row[0] for row in rows})
    return pool


def build_pool(workers: list[Worker], exclude_instance_ids: Iterable[int] = ()) -> dict[int, WorkerResources]:
    """The pool of workers the caller has already read (pages, evaluations given their workers)."""
    placed = claims_by_worker(exclude_instance_ids)
    return {w.id: worker_resources(w, WorkerShape.of(w.status or {}, w.system_reserved), placed.get(w.id),
                                   w.heartbeat_is_fresh) for w in workers}
