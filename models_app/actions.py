"""The only code that changes a model's or an instance's state. API, admin, pages and tasks call these."""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterable

from django.db import transaction
from django.db.models import Case, IntegerField, Value, When
from django.utils import timezone

from models_app.choices import InstanceState
from models_app.models import Model, ModelInstance

logger = logging.getLogger(__name__)

# Scale-down victims, least useful first: broken, then not yet running, then running.
_VICTIM_ORDER = Case(
    When(state__in=[InstanceState.ERROR, InstanceState.UNREACHABLE], then=Value(0)),
    When(state=InstanceState.PENDING, then=Value(1)),
    When(state=InstanceState.RUNNING, then=Value(3)),
    default=Value(2),
    output_field=IntegerField(),
)


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
        from workers_app.tasks import stop_instance

        for instance_id, queue in targets:
            stop_instance.apply_async(args=[instance_id], queue=queue)
        schedule_pending_instances.delay()  # the freed resources may let a pending instance fit

    transaction.on_commit(send)


def _new_instance(model: Model) -> ModelInstance:
    return ModelInstance.objects.create(model=model, name=f"{model.name}-{secrets.token_hex(3)}")


@transaction.atomic
def do_create_model(**fields) -> Model:
    model = Model.objects.create(**fields)
    do_sync_replicas(model)
    return model


@transaction.atomic
def do_update_model(model: Model, fields: dict) -> Model:
    """Changing `replicas` scales at once; other fields apply to instances created from now on."""
    for name, value in fields.items():
        setattr(model, name, value)
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
        model = Model.objects.select_for_update().get(pk=model.pk)
        current = list(ModelInstance.objects.filter(model=model).select_related("worker")
                       .annotate(victim_rank=_VICTIM_ORDER).order_by("victim_rank", "-id"))
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
    Model.objects.filter(pk=model.pk).update(replicas=0)
    model.replicas = 0
    do_sync_replicas(model)
    Model.objects.filter(pk=model.pk).delete()


def do_set_instance_state(
    instance: ModelInstance,
    state: str,
    *,
    from_states: Iterable[str] | None = None,
    message: str = "",
    **fields,
) -> bool:
    """Conditional update: applies only if the instance is still in one of `from_states`. True if applied."""
    query = ModelInstance.objects.filter(pk=instance.pk)
    if from_states is not None:
        query = query.filter(state__in=list(from_states))
    updated = query.update(state=state, state_message=message, updated_at=timezone.now(), **fields)
    if updated:
        instance.state = state
        instance.state_message = message
        for name, value in fields.items():
            setattr(instance, name, value)
        logger.info("instance %s -> %s %s", instance.name, state, message)
    return bool(updated)
