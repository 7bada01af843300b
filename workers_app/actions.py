"""State changes of workers: join, heartbeat, label edits, removal."""

from __future__ import annotations

import hashlib
import hmac
import secrets

from django.db import IntegrityError, transaction
from django.utils import timezone

from models_app.lifecycle import do_unplace, schedule_pending_after_commit
from models_app.models import ModelInstance
from workers_app.choices import WORKER_TRANSITIONS, WorkerState
from workers_app.models import Worker, WorkerSample


def merged_labels(current: dict, reported_before: dict, reported: dict) -> dict:
    """Labels a worker reports (its command line) are added; they never erase or overwrite what an operator set.
    A reported label the operator left as it was follows the worker: its new value, or gone when it is no longer
    reported."""
    untouched = {k for k, v in reported_before.items() if current.get(k) == v}
    merged = {k: v for k, v in current.items() if k not in untouched or k in reported}
    for key, value in reported.items():
        if key not in current or key in untouched:
            merged[key] = value
    return merged


class NameTaken(Exception):
    """Another live worker holds this name: the cluster token alone cannot take it over."""


def credential_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def holds_credential(worker: Worker, secret: str | None) -> bool:
    return bool(worker.credential_hash) and bool(secret) and hmac.compare_digest(
        worker.credential_hash, credential_hash(secret))


@transaction.atomic
def do_register_worker(data: dict, credential: str | None = None) -> tuple[Worker, str | None]:
    """Join, or join again. A worker that presents its own credential re-registers; a name whose worker is alive
    cannot be taken with the cluster token alone (NameTaken); a new name, or one whose worker is gone, gets a
    new credential — returned once, the worker keeps it."""
    fields = {k: v for k, v in data.items() if k not in ("name", "labels")}
    reported = dict(data.get("labels") or {})
    existing = Worker.objects.select_for_update().filter(name=data["name"]).first()
    issued = None
    if existing is not None and not holds_credential(existing, credential):
        if existing.credential_hash and existing.state == WorkerState.READY and existing.heartbeat_is_fresh:
            raise NameTaken(data["name"])
    if existing is None or not holds_credential(existing, credential):
        issued = secrets.token_urlsafe(32)
        fields["credential_hash"] = credential_hash(issued)
    labels = merged_labels(existing.labels, existing.reported_labels, reported) if existing else reported
    worker, created = Worker.objects.update_or_create(
        name=data["name"],
        defaults={**fields, "labels": labels, "reported_labels": reported, "state": WorkerState.READY,
                  "state_message": "", "last_heartbeat_at": timezone.now()},
    )
    schedule_pending_after_commit()
    return worker, issued


def _worker_sources(target: str) -> list[str]:
    return [state for state, targets in WORKER_TRANSITIONS.items() if target in targets]


def do_mark_worker_not_ready(worker: Worker, silent_since, still_serving: int = 0) -> bool:
    """Silent since before `silent_since`: not ready (only if it still is ready and still silent). `still_serving`:
    how many of its backends still answer the server's health probe (they keep running)."""
    message = f"no heartbeat since {worker.last_heartbeat_at:%Y-%m-%d %H:%M:%S} UTC"
    if still_serving:
        message += (f"; {still_serving} of its backends still answer the server's health probe and keep serving "
                    f"(nothing is moved while they do)")
    return bool(Worker.objects.filter(pk=worker.pk, state=WorkerState.READY, last_heartbeat_at__lt=silent_since).update(
        state=WorkerState.NOT_READY, updated_at=timezone.now(), state_message=message))


@transaction.atomic
def do_heartbeat(worker: Worker, status: dict | None) -> Worker:
    """Alive: ready again from any state the table lets reach ready; the latest inventory is kept."""
    now = timezone.now()
    fields = {"last_heartbeat_at": now, "updated_at": now}
    if status is not None:
        fields["status"] = status
    came_back = Worker.objects.filter(pk=worker.pk, state__in=_worker_sources(WorkerState.READY)).update(
        state=WorkerState.READY, state_message="", **fields)
    if not came_back:
        Worker.objects.filter(pk=worker.pk).update(**fields)
    else:
        schedule_pending_after_commit()
    if status is not None:
        _sample(worker.pk, now, status)
    worker.refresh_from_db()
    return worker


_sampled: dict[int, object] = {}  # worker id → the minute this process last sampled it


def _sample(worker_id: int, now, status: dict) -> None:
    """The first heartbeat of each minute leaves a sample of the worker's load (the dashboard's charts)."""
    minute = now.replace(second=0, microsecond=0)
    if _sampled.get(worker_id) == minute:
        return
    memory = status.get("memory") or {}
    gpus = [{"index": g.get("index"), "used": int((g.get("memory") or {}).get("used") or 0),
             "total": int((g.get("memory") or {}).get("total") or 0),
             "utilization": float((g.get("core") or {}).get("utilization") or 0)} for g in status.get("gpus") or []]
    try:
        with transaction.atomic():
            WorkerSample.objects.get_or_create(worker_id=worker_id, minute=minute, defaults={
                "cpu_percent": float((status.get("cpu") or {}).get("utilization") or 0),
                "ram_used": int(memory.get("used") or 0), "ram_total": int(memory.get("total") or 0), "gpus": gpus})
    except IntegrityError:  # another server process sampled it this minute
        pass
    _sampled[worker_id] = minute


@transaction.atomic
def do_update_worker(worker: Worker, fields: dict) -> Worker:
    for name, value in fields.items():
        setattr(worker, name, value)
    worker.save()
    schedule_pending_after_commit()  # new labels or a smaller reservation may let pending instances fit
    return worker


@transaction.atomic
def do_delete_worker(worker: Worker) -> None:
    """Its instances go back to pending, to be placed elsewhere."""
    do_unplace(list(ModelInstance.objects.filter(worker=worker).values_list("pk", flat=True)),
               f"worker {worker.name} was removed", cause="worker_removed")
    worker.delete()
    schedule_pending_after_commit()
