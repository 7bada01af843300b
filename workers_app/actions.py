"""State changes of workers: join, heartbeat, label edits, removal."""

from __future__ import annotations

from django.db import transaction
from django.utils import timezone

from models_app.actions import schedule_pending_after_commit
from models_app.choices import InstanceState
from models_app.models import ModelInstance
from workers_app.choices import WorkerState
from workers_app.models import Worker


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


@transaction.atomic
def do_register_worker(data: dict) -> Worker:
    fields = {k: v for k, v in data.items() if k not in ("name", "labels")}
    reported = dict(data.get("labels") or {})
    existing = Worker.objects.select_for_update().filter(name=data["name"]).first()
    labels = merged_labels(existing.labels, existing.reported_labels, reported) if existing else reported
    worker, created = Worker.objects.update_or_create(
        name=data["name"],
        defaults={**fields, "labels": labels, "reported_labels": reported, "state": WorkerState.READY,
                  "state_message": "", "last_heartbeat_at": timezone.now()},
    )
    schedule_pending_after_commit()
    return worker


@transaction.atomic
def do_heartbeat(worker: Worker, status: dict | None) -> Worker:
    was_ready = worker.state == WorkerState.READY
    worker.last_heartbeat_at = timezone.now()
    worker.state = WorkerState.READY
    worker.state_message = ""
    update = ["last_heartbeat_at", "state", "state_message", "updated_at"]
    if status is not None:
        worker.status = status
        update.append("status")
    worker.save(update_fields=update)
    if not was_ready:
        schedule_pending_after_commit()
    return worker


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
    ModelInstance.objects.filter(worker=worker).update(
        worker=None, state=InstanceState.PENDING, pid=None, port=None, gpu_indexes=[], computed_resource_claim={},
        error_kind="", state_message=f"worker {worker.name} was removed",
    )
    worker.delete()
    schedule_pending_after_commit()
