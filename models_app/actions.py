"""Changes to models: create, edit, scale, delete (and so which instances exist). API, admin, pages and tasks call
these; an instance's state changes only through models_app.lifecycle."""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterable

from django.db import transaction
from django.db.models import F

from models_app import lifecycle
from models_app.choices import ErrorKind, InstanceState
from models_app.models import Model, ModelInstance

logger = logging.getLogger(__name__)

_STATE_USEFULNESS = {InstanceState.ERROR: 0, InstanceState.UNREACHABLE: 0, InstanceState.PENDING: 1,
                     InstanceState.RUNNING: 3}


def _victim_order(instance: ModelInstance) -> tuple:
    """Scale-down victims, least useful first: broken, waiting, starting, then running;
    CPU-offloaded before fully GPU-resident; the newest first."""
    return _STATE_USEFULNESS.get(instance.state, 2), not instance.offloads_to_cpu, -instance.pk


def _after_commit_schedule(instance_ids: Iterable[int]) -> None:
    ids = list(instance_ids)
    if not ids:
        return

    def send() -> None:
        from scheduler_app.tasks import schedule_instance

        for instance_id in ids:
            schedule_instance.delay(instance_id)

    transaction.on_commit(send)


def _after_commit_stop(instances: Iterable[ModelInstance]) -> None:
    """Tell each instance's worker to end its process once the row is gone."""
    instances = list(instances)
    targets = [(i.id, i.worker.queue) for i in instances if i.worker_id is not None]
    parts = {f"worker.{p.get('worker_name')}" for i in instances for p in i.distributed_servers or []}
    if not targets and not parts:
        return

    def send() -> None:
        from scheduler_app.tasks import schedule_pending_instances
        from workers_app import logs
        from workers_app.tasks import stop_instance, sync_instances

        for instance_id, queue in targets:
            stop_instance.apply_async(args=[instance_id], queue=queue)
        for queue in parts:  # the workers of its RPC servers end them
            sync_instances.apply_async(queue=queue)
        schedule_pending_instances.delay()  # the freed resources may let a pending instance fit
        logs.forget([instance_id for instance_id, _ in targets])

    transaction.on_commit(send)


def _new_instance(model: Model) -> ModelInstance:
    return ModelInstance.objects.create(model=model, name=f"{model.name}-{secrets.token_hex(3)}",
                                        config_version=model.config_version)


@transaction.atomic
def do_create_model(**fields) -> Model:
    model = Model.objects.create(**fields)
    do_sync_replicas(model)
    return model


@transaction.atomic
def do_update_model(model: Model, fields: dict) -> Model:
    """Changing `replicas` scales at once; other fields apply to instances created from now on
    (running ones are left alone and show as outdated)."""
    changed = {name for name, value in fields.items() if getattr(model, name) != value}
    for name, value in fields.items():
        setattr(model, name, value)
    if changed - Model.LIVE_FIELDS:
        model.config_version = F("config_version") + 1
        changed.add("config_version")
        # Instances stopped by an error no restart can fix get their next try now, with the new configuration.
        _delete_instances(list(ModelInstance.objects.filter(model=model, state=InstanceState.ERROR,
                                                            error_kind=ErrorKind.PERMANENT).select_related("worker")))
    # Only what changed: the scheduler may be writing the detected categories or backend at the same moment.
    model.save(update_fields=[*sorted(changed), "updated_at"])
    model.refresh_from_db(fields=["config_version"])
    if "config_version" in changed:
        lifecycle.do_note_outdated(model, sorted(changed - {"config_version"}))
    do_sync_replicas(model)
    return model


@transaction.atomic
def do_scale_model(model: Model, replicas: int) -> Model:
    if replicas < 0:
        raise ValueError("replicas must be >= 0")
    Model.objects.filter(pk=model.pk).update(replicas=replicas)
    model.replicas = replicas
    do_sync_replicas(model)
    return model


def do_sync_replicas(model: Model) -> None:
    """Create or delete instances until the model has exactly `replicas` of them."""
    with transaction.atomic():
        # Lock the model row so two scalers never both add (or both remove) the same replica.
        model = Model.objects.select_for_update().filter(pk=model.pk).first()
        if model is None:
            return  # deleted meanwhile: whoever deleted it stopped its instances
        current = sorted(ModelInstance.objects.filter(model=model).select_related("worker"), key=_victim_order)
        missing = model.replicas - len(current)
        if missing > 0:
            _after_commit_schedule(_new_instance(model).id for _ in range(missing))
        elif missing < 0:
            _delete_instances(current[:-missing])


def _delete_instances(instances: list[ModelInstance]) -> None:
    deleted_ids = set()
    for instance in instances:
        # The row first, locked: a transition under way (it locks the row too, and writes an event) finishes before
        # the delete collects the instance's events, or finds the instance gone; never an event for a deleted row.
        if not ModelInstance.objects.select_for_update().filter(pk=instance.pk).exists():
            continue
        count, _ = ModelInstance.objects.filter(pk=instance.pk).delete()
        if count:  # someone else may have deleted it first: then they stop it too
            deleted_ids.add(instance.pk)
    _after_commit_stop(i for i in instances if i.pk in deleted_ids)


@transaction.atomic
def do_delete_instance(instance: ModelInstance) -> None:
    """End the instance; the model's replica count brings a new one (with a new id)."""
    model_id = instance.model_id
    _delete_instances([instance])
    model = Model.objects.filter(pk=model_id).first()
    if model is not None:
        do_sync_replicas(model)


@transaction.atomic
def do_delete_model(model: Model) -> None:
    """Stop the instances, then remove the model. Deleting twice, or at once from two places, is harmless."""
    Model.objects.filter(pk=model.pk).update(replicas=0)
    model.replicas = 0
    do_sync_replicas(model)
    Model.objects.filter(pk=model.pk).delete()
