"""The only code that changes a model's or an instance's state. API, admin, pages and tasks call these."""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterable
from datetime import timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import F
from django.utils import timezone

from models_app.choices import ErrorKind, InstanceState
from models_app.models import Model, ModelInstance

logger = logging.getLogger(__name__)

_STATE_USEFULNESS = {InstanceState.ERROR: 0, InstanceState.UNREACHABLE: 0, InstanceState.PENDING: 1,
                     InstanceState.RUNNING: 3}


def _victim_order(instance: ModelInstance) -> tuple:
    """Scale-down victims, least useful first: broken, waiting, starting, then running;
    CPU-offloaded before fully GPU-resident; the newest first."""
    return _STATE_USEFULNESS.get(instance.state, 2), not instance.offloads_to_cpu, -instance.pk


def restart_delay(restart_count: int) -> float:
    """Seconds before the next restart: the first at once, then base, 2×base, 4×base …, capped."""
    if restart_count <= 0:
        return 0.0
    return min(settings.RESTART_BACKOFF_BASE * 2 ** (restart_count - 1), settings.RESTART_BACKOFF_MAX)


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
    targets = [(i.id, i.worker.queue) for i in instances if i.worker_id is not None]
    if not targets:
        return

    def send() -> None:
        from scheduler_app.tasks import schedule_pending_instances
        from workers_app import logs
        from workers_app.tasks import stop_instance

        for instance_id, queue in targets:
            stop_instance.apply_async(args=[instance_id], queue=queue)
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
        model.config_version += 1
        # Instances stopped by an error no restart can fix get their next try now, with the new configuration.
        _delete_instances(list(ModelInstance.objects.filter(model=model, state=InstanceState.ERROR,
                                                            error_kind=ErrorKind.PERMANENT).select_related("worker")))
    model.save()
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


PERMANENT_SUFFIX = " (not restarted automatically: edit the model or delete the instance to try again)"


def do_fail_instance(instance: ModelInstance, message: str, *, from_states: Iterable[str],
                     permanent: bool = False) -> bool:
    """The instance failed: `error`. A transient failure books its restart (if the model wants one) as data, not a
    timer. A permanent one (bad arguments, missing file, unknown version) books none and releases its claim, so
    other instances may use the memory; editing the model or deleting the instance gives it another try."""
    if permanent:
        failed = do_set_instance_state(instance, InstanceState.ERROR, from_states=from_states,
                                       message=message + PERMANENT_SUFFIX, error_kind=ErrorKind.PERMANENT, pid=None,
                                       running_since=None, next_restart_at=None)
        if failed:
            schedule_pending_after_commit()
        return failed
    restart = Model.objects.filter(pk=instance.model_id, restart_on_error=True).exists()
    next_at = timezone.now() + timedelta(seconds=restart_delay(instance.restart_count)) if restart else None
    return do_set_instance_state(instance, InstanceState.ERROR, from_states=from_states, message=message,
                                 error_kind=ErrorKind.TRANSIENT, pid=None, running_since=None, next_restart_at=next_at)


def do_restart_instance(instance: ModelInstance) -> bool:
    """An errored instance whose restart is due starts again on the same worker."""
    now = timezone.now()
    updated = ModelInstance.objects.filter(pk=instance.pk, state=InstanceState.ERROR).exclude(
        error_kind=ErrorKind.PERMANENT).update(
        state=InstanceState.SCHEDULED, restart_count=F("restart_count") + 1, last_restart_at=now,
        next_restart_at=None, error_kind="", updated_at=now,
        state_message=f"restarting after: {instance.state_message}"[:2000])
    if updated:
        instance.refresh_from_db()
        logger.info("instance %s restarting (restart #%s)", instance.name, instance.restart_count)
    return bool(updated)


def do_mark_running(instance: ModelInstance, message: str = "") -> bool:
    return do_set_instance_state(instance, InstanceState.RUNNING, from_states=[InstanceState.STARTING],
                                 message=message, running_since=timezone.now())


def do_forgive_restarts(instance: ModelInstance) -> bool:
    """Running cleanly for RESTART_RESET_AFTER seconds: the next failure restarts at once again."""
    cutoff = timezone.now() - timedelta(seconds=settings.RESTART_RESET_AFTER)
    return bool(ModelInstance.objects.filter(pk=instance.pk, state=InstanceState.RUNNING, running_since__lte=cutoff,
                                             restart_count__gt=0).update(restart_count=0))


def do_move_off_lost_worker(worker_name: str, instance_ids: list[int]) -> int:
    """Instances of a worker that stopped answering: shown unreachable, then placed again elsewhere.
    The old worker ends their processes when it returns (they are no longer its instances)."""
    moved = ModelInstance.objects.filter(pk__in=instance_ids, state=InstanceState.UNREACHABLE).update(
        state=InstanceState.PENDING, worker=None, pid=None, port=None, gpu_indexes=[], computed_resource_claim={},
        running_since=None, error_kind="", updated_at=timezone.now(),
        state_message=f"worker {worker_name} stopped answering; placing the instance elsewhere")
    if moved:
        schedule_pending_after_commit()
    return moved


def schedule_pending_after_commit() -> None:
    """Once this transaction commits, give every pending instance another try (resources may have appeared)."""

    def send() -> None:
        from scheduler_app.tasks import schedule_pending_instances

        schedule_pending_instances.delay()

    transaction.on_commit(send)


def do_set_instance_state(
    instance: ModelInstance,
    state: str,
    *,
    from_states: Iterable[str] | None = None,
    on_worker: str | None = None,
    message: str = "",
    **fields,
) -> bool:
    """Conditional update: applies only if the instance is still in one of `from_states` (and, given `on_worker`,
    still placed on that worker). True if applied."""
    query = ModelInstance.objects.filter(pk=instance.pk)
    if from_states is not None:
        query = query.filter(state__in=list(from_states))
    if on_worker is not None:
        query = query.filter(worker__name=on_worker)
    if state != InstanceState.ERROR:
        fields.setdefault("error_kind", "")
    updated = query.update(state=state, state_message=message, updated_at=timezone.now(), **fields)
    if updated:
        instance.state = state
        instance.state_message = message
        for name, value in fields.items():
            setattr(instance, name, value)
        logger.info("instance %s -> %s %s", instance.name, state, message)
    return bool(updated)
