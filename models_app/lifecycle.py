"""An instance's lifecycle: the only code that writes an instance's state. Each thing that happens is one named
action; each goes through `_transition`, which checks the move against `INSTANCE_TRANSITIONS`, applies it as a
conditional update (two controllers never both apply it) and records an `InstanceEvent`."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from datetime import timedelta

from django.conf import settings
from django.db import connection, transaction
from django.db.models import F
from django.dispatch import Signal
from django.utils import timezone

from aimind import metrics
from models_app.choices import DELETED, BackendChoices, ErrorKind, InstanceState
from models_app.models import InstanceEvent, Model, ModelInstance

logger = logging.getLogger(__name__)
S = InstanceState
UNPLACED = {"worker": None, "pid": None, "port": None, "gpu_indexes": [], "computed_resource_claim": {},
            "running_since": None, "distributed_servers": []}
PERMANENT_SUFFIX = " (not restarted automatically: edit the model or delete the instance to try again)"
PREPARING = (S.SCHEDULED, S.DOWNLOADING, S.INITIALIZING)


# A distributed instance's RPC servers (its parts, `distributed_servers`) start over with each attempt: on a failure
# and on a restart every part is stopped and started again, subordinates first (the main waits for them).
PARTS_START_OVER = (S.ERROR, S.SCHEDULED)
PART_ACTIVE_STATES = (S.SCHEDULED, S.DOWNLOADING, S.INITIALIZING, S.STARTING, S.RUNNING, S.UNREACHABLE)


def _parts_start_over(parts: list[dict]) -> list[dict]:
    return [{**part, "state": "pending", "host": None, "port": None, "pid": None,
             "attempt": int(part.get("attempt") or 0) + 1} for part in parts]


# Sent inside the transaction with the ids of the instances a transition moved (queryset updates send no
# post_save): the gateway reloads its routing table when it commits.
instances_moved = Signal()


class IllegalTransition(ValueError):
    """Code asked for a move the lifecycle does not have: a bug, never a user's doing."""


def _insert_events(moves: list[tuple[int, str]], to: str, cause: str, message: str | list[str], now, *,
                   restart_at=None, details: list[dict] | None = None) -> None:
    """One event per (instance id, from state): one INSERT run for all rows (executemany), a sixth of what
    bulk_create's per-object work costs; `message` is one for all or one each, `details` one each (default none).
    `restart_at`: the restart a failure booked, for all."""
    messages = [message] * len(moves) if isinstance(message, str) else message
    meta = InstanceEvent._meta
    names = ("instance", "time", "from_state", "to_state", "cause", "message", "restart_at", "details")
    columns = [meta.get_field(name).column for name in names]
    quote = connection.ops.quote_name
    sql = (f"INSERT INTO {quote(meta.db_table)} ({', '.join(quote(c) for c in columns)}) "
           f"VALUES ({', '.join(['%s'] * len(columns))})")
    when = meta.get_field("time").get_db_prep_save(now, connection)
    restart = meta.get_field("restart_at").get_db_prep_save(restart_at, connection)
    kept = [meta.get_field("details").get_db_prep_save(d, connection) for d in details or [{}] * len(moves)]
    with connection.cursor() as cursor:
        cursor.executemany(sql, [(pk, when, state, to, cause, text[:4000], restart, extra)
                                 for (pk, state), text, extra in zip(moves, messages, kept, strict=True)])


def _transition(instances: ModelInstance | Iterable[int], to: str, *, cause: str, message: str = "",
                from_states: Iterable[str] | None = None, on_worker: str | None = None, **fields) -> list[int]:
    """Move the instances that are in one of `from_states` (default: every state the table lets reach `to`), and
    still on `on_worker` when given, to `to`. Returns the ids it moved; an event is recorded for each."""
    allowed = S.sources(to)
    sources = set(allowed if from_states is None else from_states)
    if sources - allowed:
        raise IllegalTransition(f"{', '.join(sorted(sources - allowed))} → {to} is not a move of an instance")
    single = instances if isinstance(instances, ModelInstance) else None
    ids = [single.pk] if single is not None else list(instances)
    if to != S.ERROR:
        fields.setdefault("error_kind", "")
    if to == S.SCHEDULED:
        fields.setdefault("measured", {})  # a new start: the last run's figures no longer describe it
    if to == S.PENDING:
        fields.setdefault("placement_explanation", {})  # back to waiting: the old "why here" no longer holds
    now = timezone.now()
    with transaction.atomic():
        query = ModelInstance.objects.select_for_update().filter(pk__in=ids, state__in=sources)
        if on_worker is not None:
            query = query.filter(worker__name=on_worker)
        rows = list(query.values_list("pk", "state", "name", "distributed_servers"))
        if not rows:
            return []
        moved = [pk for pk, *_ in rows]
        ModelInstance.objects.filter(pk__in=moved).update(state=to, state_message=message, updated_at=now, **fields)
        if to in PARTS_START_OVER and "distributed_servers" not in fields:
            for pk, _, _, parts in rows:
                if parts:
                    ModelInstance.objects.filter(pk=pk).update(distributed_servers=_parts_start_over(parts))
        # A failure's event keeps the restart it booked: the timeline shows it after the restart happened too.
        booked = fields.get("next_restart_at") if to == S.ERROR else None
        _insert_events([(pk, state) for pk, state, *_ in rows], to, cause, message, now, restart_at=booked)
        instances_moved.send(sender=ModelInstance, ids=moved)
    for _, state, name, _ in rows:
        logger.info("instance %s: %s -> %s (%s) %s", name, state, to, cause, message)
    if single is not None:
        single.state, single.state_message, single.updated_at = to, message, now
        if to in PARTS_START_OVER and "distributed_servers" not in fields and single.distributed_servers:
            single.distributed_servers = _parts_start_over(single.distributed_servers)
        for name, value in fields.items():
            setattr(single, name, value)
    return moved


# The scheduler.

def do_begin_analysis(instance_ids: Iterable[int]) -> list[int]:
    return _transition(instance_ids, S.ANALYZING, cause="analyzing", message="reading model metadata")


def do_wait_for_room(instance: ModelInstance, message: str, cause: str = "no_fit") -> bool:
    """Back to pending: nothing fits now, or the hub could not be asked; the next pass tries again."""
    return bool(_transition(instance, S.PENDING, cause=cause, message=message, from_states=[S.ANALYZING]))


def do_wait_for_room_many(instance_ids: list[int], message: str, cause: str = "no_fit",
                          explanation: dict | None = None) -> list[int]:
    """`do_wait_for_room` for several instances of a pass that wait for the same reason (and, when nothing fits,
    the scheduler's `placement_explanation` of why not)."""
    fields = {} if explanation is None else {"placement_explanation": explanation}
    return _transition(instance_ids, S.PENDING, cause=cause, message=message, from_states=[S.ANALYZING], **fields)


def do_note_room_made(instance: ModelInstance, message: str) -> bool:
    """Idle models were put to sleep to make room for this waiting instance (AIMIND_EVICT_IDLE_MODELS): its message
    and its history say which; it stays pending, and the next pass places it."""
    now = timezone.now()
    with transaction.atomic():
        if not ModelInstance.objects.select_for_update().filter(pk=instance.pk, state=S.PENDING).update(
                state_message=message[:2000], updated_at=now):
            return False
        _insert_events([(instance.pk, S.PENDING)], S.PENDING, "made_room", message, now)
    logger.info("instance %s: %s", instance.name, message)
    return True


def do_place(instance: ModelInstance, message: str, **placement) -> bool:
    """The scheduler chose a worker (and GPUs, a claim, a backend version) for the instance."""
    return bool(_transition(instance, S.SCHEDULED, cause="placed", message=message, from_states=[S.ANALYZING],
                            **placement))


PLACEMENT_FIELDS = ("worker", "gpu_indexes", "computed_resource_claim", "distributed_servers", "backend",
                    "backend_version", "placement_explanation")


def _update_rows(instances: list[ModelInstance], names: list[str]) -> None:
    """Write these fields of each instance: one statement run for all rows (executemany). Django's bulk_update
    builds a CASE per field and row, which costs more than the whole placement it records."""
    fields = [ModelInstance._meta.get_field(name) for name in names]
    quote = connection.ops.quote_name
    sql = (f"UPDATE {quote(ModelInstance._meta.db_table)} SET "
           f"{', '.join(f'{quote(f.column)} = %s' for f in fields)} WHERE {quote(ModelInstance._meta.pk.column)} = %s")
    rows = [[f.get_db_prep_save(getattr(instance, f.attname), connection) for f in fields] + [instance.pk]
            for instance in instances]
    with connection.cursor() as cursor:
        cursor.executemany(sql, rows)


def do_place_many(placements: list[tuple[ModelInstance, str, dict]]) -> list[int]:
    """`do_place` for a whole scheduler pass: (instance, message, placement fields) each. The rows are locked at
    once and written in one bulk update, the events in one insert. An instance no longer analyzing (deleted, taken
    back by the stuck sweep) is left alone. Returns the ids placed."""
    if not placements:
        return []
    unknown = {name for _, _, fields in placements for name in fields} - set(PLACEMENT_FIELDS)
    if unknown:
        raise IllegalTransition(f"a placement does not set {', '.join(sorted(unknown))}")
    now = timezone.now()
    with transaction.atomic():
        still = set(ModelInstance.objects.select_for_update().filter(
            pk__in=[instance.pk for instance, _, _ in placements], state=S.ANALYZING).values_list("pk", flat=True))
        placed = []
        for instance, message, fields in placements:
            if instance.pk not in still:
                continue
            instance.state, instance.state_message, instance.updated_at, instance.error_kind, instance.measured = (
                S.SCHEDULED, message, now, "", {})
            for name, value in fields.items():
                setattr(instance, name, value)
            placed.append((instance, message))
        if not placed:
            return []
        _update_rows([instance for instance, _ in placed],
                     ["state", "state_message", "updated_at", "error_kind", "measured", *PLACEMENT_FIELDS])
        _insert_events([(instance.pk, S.ANALYZING) for instance, _ in placed], S.SCHEDULED, "placed",
                       [message for _, message in placed], now)
        moved = [instance.pk for instance, _ in placed]
        instances_moved.send(sender=ModelInstance, ids=moved)
    for instance, message in placed:
        logger.info("instance %s: %s -> %s (%s) %s", instance.name, S.ANALYZING, S.SCHEDULED, "placed", message)
    return moved


# The node agent.

def do_begin_download(instance: ModelInstance, worker_name: str) -> bool:
    return bool(_transition(instance, S.DOWNLOADING, cause="download", message="downloading the model files",
                            from_states=[S.SCHEDULED], on_worker=worker_name, download_progress=0))


def do_begin_install(instance: ModelInstance, worker_name: str, message: str) -> bool:
    return bool(_transition(instance, S.INITIALIZING, cause="install", message=message,
                            from_states=[S.SCHEDULED, S.DOWNLOADING], on_worker=worker_name))


def do_begin_start(instance: ModelInstance, worker_name: str, **fields) -> bool:
    return bool(_transition(instance, S.STARTING, cause="start", message="starting the backend",
                            from_states=PREPARING, on_worker=worker_name, **fields))


def do_mark_running(instance: ModelInstance, message: str = "") -> bool:
    return bool(_transition(instance, S.RUNNING, cause="healthy", message=message, from_states=[S.STARTING],
                            running_since=timezone.now()))


def do_fail_instance(instance: ModelInstance, message: str, *, from_states: Iterable[str],
                     permanent: bool = False, cause: str = "failed") -> bool:
    """The instance failed: `error`. A transient failure books its restart (if the model wants one) as data, not a
    timer. A permanent one (bad arguments, missing file, unknown version) books none and releases its claim, so
    other instances may use the memory; editing the model or deleting the instance gives it another try."""
    if permanent:
        failed = bool(_transition(instance, S.ERROR, cause="refused", message=message + PERMANENT_SUFFIX,
                                  from_states=from_states, error_kind=ErrorKind.PERMANENT, pid=None,
                                  running_since=None, next_restart_at=None))
        if failed:
            schedule_pending_after_commit()
        return failed
    restart = Model.objects.filter(pk=instance.model_id, restart_on_error=True).exists()
    next_at = timezone.now() + timedelta(seconds=restart_delay(instance.restart_count)) if restart else None
    # The failed event keeps `next_at` as its restart_at ("restart booked for T" on the timeline).
    return bool(_transition(instance, S.ERROR, cause=cause, message=message, from_states=from_states,
                            error_kind=ErrorKind.TRANSIENT, pid=None, running_since=None, next_restart_at=next_at))


def restart_delay(restart_count: int) -> float:
    """Seconds before the next restart: the first at once, then base, 2×base, 4×base …, capped."""
    if restart_count <= 0:
        return 0.0
    return min(settings.RESTART_BACKOFF_BASE * 2 ** (restart_count - 1), settings.RESTART_BACKOFF_MAX)


def do_restart_instance(instance: ModelInstance) -> bool:
    """An errored instance whose restart is due starts again on the same worker (never a permanent error)."""
    if instance.error_kind == ErrorKind.PERMANENT:
        return False
    moved = _transition(instance, S.SCHEDULED, cause="restart", from_states=[S.ERROR],
                        message=f"restarting after: {instance.state_message}"[:2000],
                        restart_count=F("restart_count") + 1, last_restart_at=timezone.now(), next_restart_at=None)
    if moved:
        name = Model.objects.filter(pk=instance.model_id).values_list("name", flat=True).first() or ""
        transaction.on_commit(lambda: metrics.note_restart(name))
        instance.refresh_from_db()
    return bool(moved)


def do_restart_on_returning_worker(instance_ids: Iterable[int], worker_name: str, message: str,
                                   cause: str = "worker_returned") -> list[int]:
    """A worker stopped or restarted: what it ran (or was preparing) starts again there."""
    return _transition(instance_ids, S.SCHEDULED, cause=cause, message=message, on_worker=worker_name,
                       from_states=[S.DOWNLOADING, S.INITIALIZING, S.STARTING, S.RUNNING, S.UNREACHABLE], pid=None)


def do_mark_reachable(instance: ModelInstance, worker_name: str) -> bool:
    """Its worker answers again and the backend is still healthy: running, as before."""
    return bool(_transition(instance, S.RUNNING, cause="worker_back", message="", from_states=[S.UNREACHABLE],
                            on_worker=worker_name))


def do_record_download_progress(instance: ModelInstance, percent: float) -> bool:
    """False when the instance is no longer downloading (deleted, moved): its download should stop."""
    return bool(ModelInstance.objects.filter(pk=instance.pk, state=S.DOWNLOADING).update(
        download_progress=round(percent, 1), updated_at=timezone.now()))


def do_record_preparation(instance: ModelInstance, message: str) -> None:
    """An install's progress (or a still-alive note): shown as the message; it also tells the sweep it is alive."""
    ModelInstance.objects.filter(pk=instance.pk, state__in=PREPARING).update(state_message=message[:1000],
                                                                            updated_at=timezone.now())


def do_note_alive(instance_ids: Iterable[int]) -> None:
    if instance_ids:
        ModelInstance.objects.filter(pk__in=list(instance_ids), state__in=PREPARING).update(updated_at=timezone.now())


OVER_CLAIM_RATIO = 1.15  # a backend using more than its claim by this much is flagged
OVER_CLAIM_FLOOR = 4 * 1024**2  # and by at least this many bytes (a few MB over a tiny claim is no news)
OVER_CLAIM_CLEAR_RATIO = 1.05  # a flagged one stays flagged until it is back below this (no event per wobble)


def over_claim(claim: dict, measured: dict, ratio: float = OVER_CLAIM_RATIO, floor: int = OVER_CLAIM_FLOOR) -> str:
    """What a backend uses beyond its claim (RAM, each GPU), by more than 15 % (`ratio`) and `floor` bytes: "" when
    within it or the claim is unknown."""
    if not claim or claim.get("unknown"):
        return ""
    gib = 1024**3
    found = []
    pairs = [("RAM", int(claim.get("ram") or 0), int(measured.get("ram") or 0))] + [
        (f"GPU {index}", int((claim.get("vram") or {}).get(index) or 0), int(used or 0))
        for index, used in sorted((measured.get("vram") or {}).items())]
    for name, claimed, used in pairs:
        if not claimed:  # nothing claimed there (a GPU-only backend's RAM, a GPU it was not placed on): no yardstick
            continue
        if used > claimed * ratio and used - claimed > floor:
            more = f"+{(used / claimed - 1) * 100:.0f} %"
            found.append(f"{name}: uses {used / gib:.2f} GiB, claimed {claimed / gib:.2f} GiB ({more})")
    return "; ".join(found)


def do_note_measured(worker_id: int, measured: dict[str, dict]) -> list[int]:
    """A worker's sample of what its backends really use (`measured` by instance id): kept on each instance that is
    still starting or running there, with `over_claim` saying where it uses more than it claimed. Crossing into
    over-claim (above 115 %) records an event; the flag then stays until its use is back below 105 % of the claim,
    so a use hovering around the line records one event, not one per crossing. Returns the ids flagged just now."""
    by_id = {int(key): sample for key, sample in measured.items() if str(key).isascii() and str(key).isdigit()}
    if not by_id:
        return []
    now = timezone.now()
    flagged, events = [], []
    with transaction.atomic():
        rows = ModelInstance.objects.select_for_update().filter(
            pk__in=list(by_id), worker_id=worker_id, state__in=[S.STARTING, S.RUNNING]).values_list(
            "pk", "state", "computed_resource_claim", "measured")
        for pk, state, claim, before in rows:
            sample = by_id[pk]
            kept = {"ram": int(sample.get("ram") or 0),
                    "vram": {str(i): int(v) for i, v in (sample.get("vram") or {}).items()}, "at": now.isoformat()}
            was_over = bool((before or {}).get("over_claim"))
            kept["over_claim"] = (over_claim(claim or {}, kept, OVER_CLAIM_CLEAR_RATIO, 0) if was_over
                                  else over_claim(claim or {}, kept))
            ModelInstance.objects.filter(pk=pk).update(measured=kept)
            if kept["over_claim"] and not was_over:
                flagged.append(pk)
                events.append(((pk, state), f"uses more than it claimed: {kept['over_claim']}"))
        for move, message in events:
            _insert_events([move], move[1], "over_claim", message, now)
    for pk, (_, message) in zip(flagged, events, strict=True):
        logger.warning("instance %s %s", pk, message)
    return flagged


def do_note_outdated(model: Model, fields: list[str]) -> None:
    """The model's configuration changed: each instance created before it records, in its history, that it now runs
    an older configuration (its state stays; deleting it gets one with the new configuration)."""
    rows = list(ModelInstance.objects.filter(model=model, config_version__lt=model.config_version)
                .values_list("pk", "state"))
    message = f"the model's configuration changed ({', '.join(fields)}); delete the instance to get the new one"
    now = timezone.now()
    for state, moves in _by_state(rows).items():
        _insert_events(moves, state, "outdated", message, now)


def note_deleted(instance_id: int, state: str, message: str, details: dict) -> None:
    """The instance's row is being deleted (models_app.actions, under its lock): its history gets a last event,
    `deleted`, saying why and by whom, with `details` keeping its name, model and worker (the row is gone)."""
    _insert_events([(instance_id, state)], DELETED, "deleted", message, timezone.now(), details=[details])
    logger.info("instance %s: %s -> deleted: %s", details.get("instance_name") or instance_id, state, message)


def _by_state(rows: list[tuple[int, str]]) -> dict[str, list[tuple[int, str]]]:
    grouped: dict[str, list[tuple[int, str]]] = {}
    for pk, state in rows:
        grouped.setdefault(state, []).append((pk, state))
    return grouped


def do_record_downloaded(instance: ModelInstance, path: str) -> bool:
    return bool(ModelInstance.objects.filter(pk=instance.pk, state=S.DOWNLOADING).update(
        download_progress=100, resolved_path=path, updated_at=timezone.now()))


def do_record_process(instance: ModelInstance, pid: int, port: int) -> None:
    ModelInstance.objects.filter(pk=instance.pk, state=S.STARTING).update(pid=pid, port=port)


def do_forgive_restarts(instance: ModelInstance) -> bool:
    """Running cleanly for RESTART_RESET_AFTER seconds: the next failure restarts at once again."""
    cutoff = timezone.now() - timedelta(seconds=settings.RESTART_RESET_AFTER)
    return bool(ModelInstance.objects.filter(pk=instance.pk, state=S.RUNNING, running_since__lte=cutoff,
                                             restart_count__gt=0).update(restart_count=0))


# The parts of a distributed instance (the RPC servers on its subordinate workers).

def do_record_part_ready(instance_id: int, index: int, worker_id: int, attempt: int, *, host: str, port: int,
                         pid: int) -> bool:
    """A subordinate's RPC server answers: the main may use it. Only for the attempt it was started for."""
    with transaction.atomic():
        instance = ModelInstance.objects.select_for_update().filter(
            pk=instance_id, state__in=PART_ACTIVE_STATES).first()
        parts = list(instance.distributed_servers or []) if instance is not None else []
        if not 0 <= index < len(parts) or parts[index].get("worker_id") != worker_id \
                or int(parts[index].get("attempt") or 0) != attempt:
            return False
        parts[index] = {**parts[index], "state": "ready", "host": host, "port": port, "pid": pid}
        ModelInstance.objects.filter(pk=instance_id).update(distributed_servers=parts, updated_at=timezone.now())
    return True


def do_fail_part(instance: ModelInstance, index: int, message: str) -> bool:
    """A subordinate part (llama.cpp's RPC server, or a vLLM node) died or would not start: the whole instance
    fails, and restarts as a group."""
    part = (instance.distributed_servers or [])[index]
    what = f"vLLM node {index + 1}" if instance.backend == BackendChoices.VLLM else f"RPC server {index}"
    where = f"{what} on worker {part.get('worker_name')}" + (
        f" (port {part['port']})" if part.get("port") else "")
    return do_fail_instance(instance, f"{where}: {message}", cause="part_failed", from_states=PART_ACTIVE_STATES)


def instances_with_parts_on(worker_id: int) -> list[int]:
    """The distributed instances (not failed for good) with a part on this worker."""
    return [pk for pk, parts in ModelInstance.objects.exclude(distributed_servers=[]).exclude(
        error_kind=ErrorKind.PERMANENT).values_list("pk", "distributed_servers")
        if any(p.get("worker_id") == worker_id for p in parts or [])]


def do_lose_parts(worker_name: str, instance_ids: Iterable[int]) -> list[int]:
    """A subordinate worker went silent: these instances, each with a part on it, fail with that cause and are placed
    again (the worker may not return; the main and the other parts end theirs when they see the instance gone)."""
    hit = list(instance_ids)
    if not hit:
        return []
    message = f"subordinate worker {worker_name} is not ready"
    hit = _transition(hit, S.ERROR, cause="part_lost", message=message, from_states=PART_ACTIVE_STATES,
                      error_kind=ErrorKind.TRANSIENT, pid=None, running_since=None, next_restart_at=None)
    return do_unplace(hit, f"{message}; placing the instance again", cause="moved")


# Lost, removed and stuck.

def do_mark_unreachable(worker_name: str, keep: Iterable[int] = ()) -> list[int]:
    """The worker went silent: what it ran is shown unreachable (a permanent error stays as it is), except the
    instances in `keep` (their backends still answer the server's health probe)."""
    ids = ModelInstance.objects.filter(worker__name=worker_name).exclude(error_kind=ErrorKind.PERMANENT) \
        .exclude(pk__in=list(keep)).values_list("pk", flat=True)
    return _transition(list(ids), S.UNREACHABLE, cause="worker_lost", message=f"worker {worker_name} is not ready",
                       from_states=[*S.on_worker(), S.ERROR])


def do_mark_answering(instance_ids: Iterable[int]) -> list[int]:
    """Unreachable instances whose backends answer the server's own probe after all: running again (and served)."""
    return _transition(list(instance_ids), S.RUNNING, cause="answers_probe", from_states=[S.UNREACHABLE],
                       message="its worker is silent, but its backend answers the server's health probe")


def do_move_off_lost_worker(worker_name: str, instance_ids: Iterable[int]) -> list[int]:
    """Unreachable instances of a worker still not ready: placed again elsewhere. The old worker ends their
    processes when it returns (they are no longer its instances)."""
    moved = _transition(instance_ids, S.PENDING, cause="moved", from_states=[S.UNREACHABLE], **UNPLACED,
                        message=f"worker {worker_name} stopped answering; placing the instance elsewhere")
    if moved:
        schedule_pending_after_commit()
    return moved


def do_unplace(instance_ids: Iterable[int], message: str, cause: str) -> list[int]:
    """Back to pending from wherever it was placed (its worker was removed, or it was stuck): placed again."""
    moved = _transition(instance_ids, S.PENDING, cause=cause, message=message, **UNPLACED,
                        from_states=S.sources(S.PENDING) - {S.ANALYZING})
    if moved:
        schedule_pending_after_commit()
    return moved


def do_sweep_stuck(stuck_after: float | None = None) -> dict[str, int]:
    """Instances nobody moved for `stuck_after` seconds while analysing, scheduled or preparing (a killed scheduler,
    a lost launch task, a worker that died mid-install): back to pending, to be placed again."""
    cutoff = timezone.now() - timedelta(seconds=settings.STUCK_AFTER if stuck_after is None else stuck_after)
    swept: dict[str, int] = {}
    for state in (S.ANALYZING, *PREPARING):
        ids = list(ModelInstance.objects.filter(state=state, updated_at__lt=cutoff).values_list("pk", flat=True))
        if not ids:
            continue
        message = f"was {state} for more than {settings.STUCK_AFTER:.0f} s without progress; placing it again"
        moved = _transition(ids, S.PENDING, cause="stuck", message=message, from_states=[state], **UNPLACED)
        swept[state] = len(moved)
    if swept:
        schedule_pending_after_commit()
    return swept


def do_prune_events(keep_days: float | None = None) -> int:
    """Instance histories older than AIMIND_EVENT_RETENTION_DAYS (deleted instances' too: their events outlive the
    row until then), and the dashboard's per-minute samples older than AIMIND_SAMPLE_RETENTION_HOURS, are deleted.
    Returns the events deleted."""
    from gateway_app.models import UsageMinute
    from workers_app.models import WorkerSample

    cutoff = timezone.now() - timedelta(days=settings.EVENT_RETENTION_DAYS if keep_days is None else keep_days)
    deleted, _ = InstanceEvent.objects.filter(time__lt=cutoff).delete()
    samples_cutoff = timezone.now() - timedelta(hours=settings.SAMPLE_RETENTION_HOURS)
    UsageMinute.objects.filter(minute__lt=samples_cutoff).delete()
    WorkerSample.objects.filter(minute__lt=samples_cutoff).delete()
    return deleted


def schedule_pending_after_commit() -> None:
    """Once this transaction commits, give every pending instance another try (resources may have appeared)."""

    def send() -> None:
        from scheduler_app.tasks import schedule_pending_instances

        schedule_pending_instances.delay()

    transaction.on_commit(send)
