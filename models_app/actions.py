"""Changes to models: create, edit, scale, delete (and so which instances exist). API, admin, pages and tasks call
these; an instance's state changes only through models_app.lifecycle."""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterable
from datetime import datetime, timedelta

from django.db import transaction
from django.db.models import Count, F, Max, Q, QuerySet
from django.utils import timezone

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


def _by(user: str) -> str:
    return f" by {user}" if user else ""


@transaction.atomic
def do_update_model(model: Model, fields: dict, by: str = "") -> Model:
    """Changing `replicas` scales at once; other fields apply to instances created from now on
    (running ones are left alone and show as outdated). `by`: who asked (named in a deleted instance's history)."""
    changed = {name for name, value in fields.items() if getattr(model, name) != value}
    for name, value in fields.items():
        setattr(model, name, value)
    if changed - Model.LIVE_FIELDS:
        model.config_version = F("config_version") + 1
        changed.add("config_version")
        # Instances stopped by an error no restart can fix get their next try now, with the new configuration.
        _delete_instances(list(ModelInstance.objects.filter(model=model, state=InstanceState.ERROR,
                                                            error_kind=ErrorKind.PERMANENT).select_related("worker")),
                          f"its model was edited{_by(by)}: failed for good, it is replaced by an instance with the "
                          f"new configuration")
    # Only what changed: the scheduler may be writing the detected categories or backend at the same moment.
    model.save(update_fields=[*sorted(changed), "updated_at"])
    model.refresh_from_db(fields=["config_version"])
    if "config_version" in changed:
        lifecycle.do_note_outdated(model, sorted(changed - {"config_version"}))
    if model.sleep_after_minutes is None and Model.objects.filter(pk=model.pk, asleep=True).update(asleep=False):
        model.asleep = False  # no longer a model that sleeps: it wakes
    do_sync_replicas(model, f"scale-down: its model was edited{_by(by)} to {model.replicas} replicas")
    return model


@transaction.atomic
def do_scale_model(model: Model, replicas: int, by: str = "") -> Model:
    if replicas < 0:
        raise ValueError("replicas must be >= 0")
    # Start and Stop are the operator's word: a sleeping model started runs now (and may sleep again when idle).
    Model.objects.filter(pk=model.pk).update(replicas=replicas, asleep=False)
    model.replicas, model.asleep = replicas, False
    do_sync_replicas(model, f"its model was stopped{_by(by)}" if replicas == 0 else
                     f"scale-down: its model was scaled{_by(by)} to {replicas} replicas")
    return model


def wanted_replicas(model: Model) -> int:
    """How many instances the model should have: `replicas`, or none while it sleeps (a request wakes it)."""
    return 0 if model.asleep else model.replicas


def do_sync_replicas(model: Model, reason: str = "") -> None:
    """Create or delete instances until the model has exactly as many as it wants (`wanted_replicas`). `reason`:
    why, in the history of an instance it deletes."""
    with transaction.atomic():
        # Lock the model row so two scalers never both add (or both remove) the same replica.
        model = Model.objects.select_for_update().filter(pk=model.pk).first()
        if model is None:
            return  # deleted meanwhile: whoever deleted it stopped its instances
        current = sorted(ModelInstance.objects.filter(model=model).select_related("worker"), key=_victim_order)
        missing = wanted_replicas(model) - len(current)
        if missing > 0:
            _after_commit_schedule(_new_instance(model).id for _ in range(missing))
        elif missing < 0:
            _delete_instances(current[:-missing], reason or f"scale-down: its model wants {wanted_replicas(model)} "
                                                             f"replicas")


def _delete_instances(instances: list[ModelInstance], reason: str) -> None:
    """Delete the instances; each one's history is kept and ends with a `deleted` event saying `reason`."""
    from workers_app.models import Worker

    deleted_ids = set()
    model_names = dict(Model.objects.filter(pk__in={i.model_id for i in instances}).values_list("pk", "name"))
    worker_names = dict(Worker.objects.filter(pk__in={i.worker_id for i in instances if i.worker_id}).values_list(
        "pk", "name"))
    for instance in instances:
        # The row first, locked: a transition under way (it locks the row too, and writes an event) finishes before
        # the delete, so the `deleted` event comes last and says the state it was deleted in; a transition that
        # comes after finds the instance gone and records nothing.
        row = ModelInstance.objects.select_for_update().filter(pk=instance.pk).values_list(
            "state", "name", "worker_id").first()
        if row is None:
            continue
        count, _ = ModelInstance.objects.filter(pk=instance.pk).delete()
        if count:  # someone else may have deleted it first: then they stop it too
            deleted_ids.add(instance.pk)
            state, name, worker_id = row
            if worker_id and worker_id not in worker_names:  # placed elsewhere since it was read
                worker_names[worker_id] = Worker.objects.filter(pk=worker_id).values_list("name", flat=True).first()
            worker = worker_names.get(worker_id) if worker_id else None
            lifecycle.note_deleted(instance.pk, state, reason, {
                "instance_name": name, "model_id": instance.model_id,
                "model_name": model_names.get(instance.model_id, ""), "worker_name": worker or ""})
    _after_commit_stop(i for i in instances if i.pk in deleted_ids)


@transaction.atomic
def do_delete_instance(instance: ModelInstance, by: str = "") -> None:
    """End the instance; the model's replica count brings a new one (with a new id). `by`: who asked."""
    model_id = instance.model_id
    _delete_instances([instance], f"deleted{_by(by)}; the model's replica count brings a new instance")
    model = Model.objects.filter(pk=model_id).first()
    if model is not None:
        do_sync_replicas(model)


@transaction.atomic
def do_delete_model(model: Model, by: str = "") -> None:
    """Stop the instances, then remove the model. Deleting twice, or at once from two places, is harmless."""
    Model.objects.filter(pk=model.pk).update(replicas=0)
    model.replicas = 0
    do_sync_replicas(model, f"its model {model.name} was deleted{_by(by)}")
    Model.objects.filter(pk=model.pk).delete()


# Sleeping when idle, waking on a request (SPEC: `sleep_after_minutes`, `asleep`, `last_request_at`).

STARTING_STATES = (InstanceState.SCHEDULED, InstanceState.DOWNLOADING, InstanceState.INITIALIZING,
                   InstanceState.STARTING)


def sleepers() -> QuerySet:
    """Models that may be put to sleep now: they opted in, are awake and have replicas. Each row carries
    `newest_running_since` (for `active_at`) and `starting`: how many of its replicas are being placed or started
    (a model is never put to sleep while one is)."""
    return Model.objects.filter(sleep_after_minutes__isnull=False, asleep=False, replicas__gt=0).annotate(
        newest_running_since=Max("instances__running_since"),
        starting=Count("instances", filter=Q(instances__state__in=STARTING_STATES)))


def active_at(model: Model) -> datetime:
    """When a `sleepers()` row was last in use: its last request, or when it was created or its newest replica began
    running, whichever is latest (a model just started is not idle, however old its last request)."""
    return max(t for t in (model.last_request_at, model.created_at, model.newest_running_since) if t is not None)


def do_sleep_model(model: Model, message: str, idle_before: datetime | None = None) -> bool:
    """Put a model that opted into sleeping to sleep: `asleep`, and its instances deleted as by a scale-down (their
    backends stop, their resources are freed); `replicas` is kept for when it wakes. With `idle_before`, only if it
    is still idle since before then (a request may have come meanwhile). True when this call put it to sleep."""
    with transaction.atomic():
        # The row first, locked (PostgreSQL locks no row of a grouped query): a wake or an edit waits, or went first.
        if not Model.objects.select_for_update().filter(pk=model.pk).exists():
            return False
        found = sleepers().filter(pk=model.pk).first()
        if found is None or (idle_before is not None and (found.starting or active_at(found) >= idle_before)):
            return False
        Model.objects.filter(pk=model.pk).update(asleep=True, updated_at=timezone.now())
        _delete_instances(list(ModelInstance.objects.filter(model=model.pk).select_related("worker")),
                          f"its model was put to sleep: {message}")
    model.asleep = True
    logger.info("model %s is asleep: %s", model.name, message)
    return True


def do_sleep_idle_models(now: datetime | None = None) -> list[str]:
    """The beat's check: every model that has had no request for its `sleep_after_minutes` is put to sleep.
    Returns their names."""
    now = now or timezone.now()
    slept = []
    for model in sleepers():
        cutoff = now - timedelta(minutes=model.sleep_after_minutes)
        if model.starting or active_at(model) >= cutoff:
            continue
        idle = (now - active_at(model)).total_seconds() / 60
        if do_sleep_model(model, f"no request for {idle:.0f} min (sleeps after {model.sleep_after_minutes} min "
                                 f"idle)", idle_before=cutoff):
            slept.append(model.name)
    return slept


def do_wake_model(model_id: int) -> bool:
    """A request came for a sleeping model: it wakes, its instances are created and scheduled as on a scale-up, and
    the request counts as its last (it does not fall asleep again at once). Two processes waking it at the same
    moment create the instances once. True when this call woke it."""
    now = timezone.now()
    with transaction.atomic():
        # Under the row's lock the second waker finds it awake: a conditional update, one winner.
        if not Model.objects.select_for_update().filter(pk=model_id, asleep=True).exists():
            return False
        if not Model.objects.filter(pk=model_id, asleep=True).update(asleep=False, last_request_at=now,
                                                                      updated_at=now):
            return False
        do_sync_replicas(Model(pk=model_id))
    logger.info("model %s woke on a request", model_id)
    return True
