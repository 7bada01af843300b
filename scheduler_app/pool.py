"""The pool: what every worker can still give, read in two queries — the workers, then the claims placed on them.

A pass reads every worker and every claim, but a worker's inventory, labels and reservation, and most claims, change
far less often than passes run. Each is parsed once per content and kept, keyed by the very text the pass read (inside
its transaction, under its locks), so a kept parse is never stale: a changed row is a different key. What changes with
every heartbeat is kept out of that key: whether the heartbeat is recent is judged by the database in the same query,
and a status's use figures (CPU, RAM and GPU `used`, `utilization`, `used_by_others`, new in every heartbeat) are cut
out of its text, so a worker whose inventory is the same is not parsed again; of those figures the scheduler reads
only what other processes hold on each GPU (`used_by_others`), taken from the text just read.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Iterable
from datetime import timedelta
from functools import partial
from typing import NamedTuple

from django.conf import settings
from django.db.models import BooleanField, ExpressionWrapper, Q, TextField
from django.db.models.base import ModelState
from django.db.models.functions import Cast
from django.db.models.signals import post_init, pre_init
from django.utils import timezone

from models_app.choices import ErrorKind, InstanceState
from models_app.models import ModelInstance
from scheduler_app.resources import ClaimTotals, WorkerResources, WorkerShape, parse_claim, worker_resources
from workers_app.models import Worker

WORKER_FIELDS = ["id", "name", "labels", "system_reserved", "status", "state"]  # in the model's order (from_db)
NO_SERVERS = ("[]", "")
CLAIMS_KEPT = 10_000  # distinct claim texts kept between passes; past it the memo starts over


USE_FIGURES = ("used", "used_by_others", "utilization")  # a status's figures that every heartbeat changes
_USE_FIGURES = frozenset(USE_FIGURES)
# One of them as written in the status's JSON text: the name, a complete JSON string (a quote inside a string is
# escaped, so `"used":` cannot match inside one), followed by a number. re.split gives the text around the figures,
# each figure's name, and its number.
_FIGURE = re.compile(r'"(used|used_by_others|utilization)":\s*(-?[0-9][0-9.eE+-]*)')


def _number(text: str) -> int | float:
    """A JSON number as json.loads reads it: an int unless it has a fraction or an exponent."""
    try:
        return int(text)
    except ValueError:
        return float(text)


def _figures_in(node: dict | list, found: list) -> None:
    """The use figures in a parsed status, in the order they are written: (the dict holding it, name, number).
    json.loads makes plain dicts, lists, ints and floats (a bool is not an int here), so types are compared."""
    if type(node) is dict:
        for key, value in node.items():
            kind = type(value)
            if kind is dict or kind is list:
                _figures_in(value, found)
            elif key in _USE_FIGURES and (kind is int or kind is float):
                found.append((node, key, value))
    else:
        for value in node:
            kind = type(value)
            if kind is dict or kind is list:
                _figures_in(value, found)


def _others_at(status, names: list[str], figures: list[str]) -> tuple[tuple[int, int], ...] | None:
    """Where each GPU's `memory.used_by_others` is among the figures cut out of the text: (its position, the GPU's
    index). None when the text and the parse do not agree figure for figure (then the worker is parsed every time)."""
    if type(status) is not dict:
        return None
    found: list = []
    _figures_in(status, found)
    try:
        numbers = list(map(int, figures))
    except ValueError:  # a fraction or an exponent
        numbers = [_number(figure) for figure in figures]
    if [key for _, key, _ in found] != names or [value for _, _, value in found] != numbers:
        return None
    gpus = status.get("gpus")
    memories = {id(g.get("memory")): int(g.get("index", n)) for n, g in enumerate(gpus or [])
                if isinstance(g, dict) and isinstance(g.get("memory"), dict)}
    at = tuple((position, memories[id(holder)]) for position, (holder, key, _) in enumerate(found)
               if key == "used_by_others" and id(holder) in memories)
    if len(at) != sum("used_by_others" in g["memory"] for g in gpus or [] if isinstance(g, dict)
                      and isinstance(g.get("memory"), dict)):
        return None  # a GPU's used_by_others that is not a plain number: read from the parse, every time
    return at


class _KeptWorker(NamedTuple):
    texts: tuple[str, str, str]  # labels, system_reserved, status, as last read
    parsed: tuple[dict, dict, dict]  # labels, system_reserved, status (its use figures those of the first read)
    shape: WorkerShape  # with used_by_others as last read
    # Cut out of the status text when it first changes (a worker read once costs no more than a parse):
    inventory: list[str] | None = None  # the status text around its use figures, with each figure's name
    others_at: tuple[tuple[int, int], ...] | None = None  # see _others_at
    others_read: list[str] | None = None  # the used_by_others figures as last read, in the order of others_at


def _cut(status_text: str) -> tuple[list[str], list[str]]:
    """A status's text around its use figures (with each figure's name), and the figures."""
    inventory = _FIGURE.split(status_text or "")
    figures = inventory[2::3]
    del inventory[2::3]
    return inventory, figures


class _Parsed:
    """What was parsed from one content, kept between passes (never mutated once made)."""

    _workers: dict[int, _KeptWorker] = {}
    _claims: dict[str, tuple[int, tuple[tuple[int, int], ...]]] = {}
    _servers: dict[str, list[tuple[int, tuple[int, tuple[tuple[int, int], ...]]]]] = {}

    @classmethod
    def worker(cls, worker_id: int, labels_text: str, reserved_text: str,
               status_text: str) -> tuple[tuple[dict, dict, dict], WorkerShape]:
        """The worker's labels, reservation and status, and its shape. The status is parsed again only when its text
        changed outside its use figures; then the shape takes `used_by_others` from the figures just read. The status
        returned is the kept parse: its use figures may be an earlier heartbeat's (the scheduler reads none of them
        from it)."""
        texts = (labels_text, reserved_text, status_text)
        kept = cls._workers.get(worker_id)
        if kept is not None and kept.texts == texts:
            return kept.parsed, kept.shape
        if kept is not None and kept.texts[0] == labels_text and kept.texts[1] == reserved_text:
            if kept.inventory is None:  # its first change: where the figures are in the text that was parsed
                inventory, figures = _cut(kept.texts[2])
                others_at = _others_at(kept.parsed[2], inventory[1::2], figures)
                kept = kept._replace(inventory=inventory, others_at=others_at,
                                     others_read=[figures[position] for position, _ in others_at or ()])
            inventory, figures = _cut(status_text)
            if kept.others_at is not None and kept.inventory == inventory:  # only its use figures changed
                others_read = [figures[position] for position, _ in kept.others_at]
                shape = kept.shape
                if others_read != kept.others_read:
                    try:
                        sizes = list(map(int, others_read))
                    except ValueError:  # a fraction or an exponent
                        sizes = [int(_number(text)) for text in others_read]
                    others = {index: size for (_, index), size in zip(kept.others_at, sizes, strict=True)
                              if size > 0}
                    if others != shape.gpu_others:
                        shape = WorkerShape(shape.ram_total, shape.gpu_total, shape.gpu_order, shape.capacity, others)
                cls._workers[worker_id] = _KeptWorker(texts, kept.parsed, shape, kept.inventory, kept.others_at,
                                                      others_read)
                return kept.parsed, shape
        labels, reserved, status = (json.loads(t) if t else {} for t in (labels_text, reserved_text, status_text))
        shape = WorkerShape.of(status, reserved)
        cls._workers[worker_id] = _KeptWorker(texts, (labels, reserved, status), shape)
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
    reservation and status are the kept parses, shared between passes: read them, never change them. Its status is
    current but for its use figures (`used`, `utilization`, `used_by_others`), which may be those of an earlier
    heartbeat with the same inventory; the pool's own figures (`gpu_others`, `gpu_free`) are the row's."""
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
    as_loaded = _worker_as_loaded if not (pre_init.has_listeners(Worker) or post_init.has_listeners(Worker)) \
        else partial(Worker.from_db, field_names=WORKER_FIELDS)
    pool = []
    for worker_id, name, state, fresh, labels_text, reserved_text, status_text in rows:
        (labels, reserved, status), shape = _Parsed.worker(worker_id, labels_text, reserved_text, status_text)
        worker = as_loaded(db, values=(worker_id, name, labels, reserved, status, state))
        pool.append(worker_resources(worker, shape, placed.get(worker_id), bool(fresh)))
    _Parsed.forget_workers_except({row[0] for row in rows})
    return pool


def _worker_as_loaded(db: str, values: tuple) -> Worker:
    """What Worker.from_db(db, WORKER_FIELDS, values) gives (the other fields deferred: loaded when first read),
    made without Model.__init__'s walk over every field, which costs more than the rest of a pool read's work for a
    worker: the values go into the instance's dict, where Model.__init__'s setattr puts them (plain fields have no
    setter). Used only while nothing listens to Worker's init signals, which Model.__init__ would send."""
    worker = object.__new__(Worker)
    state = ModelState()
    state.adding, state.db = False, db
    vars(worker).update(zip(WORKER_FIELDS, values, strict=True))
    worker._state = state
    return worker


def build_pool(workers: list[Worker], exclude_instance_ids: Iterable[int] = ()) -> dict[int, WorkerResources]:
    """The pool of workers the caller has already read (pages, evaluations given their workers)."""
    placed = claims_by_worker(exclude_instance_ids)
    return {w.id: worker_resources(w, WorkerShape.of(w.status or {}, w.system_reserved), placed.get(w.id),
                                   w.heartbeat_is_fresh) for w in workers}
