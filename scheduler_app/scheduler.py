"""Place instances: estimate → filter workers → select candidates → score → book the claim.

A pass places a batch of pending instances against one locked snapshot of the cluster, booking each
placement in memory before the next, so a burst never double-books a GPU and costs one read of the
cluster, not one per instance.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from django.conf import settings
from django.db import transaction

from aimind import metrics
from models_app.choices import InstanceState
from models_app.lifecycle import (
    do_begin_analysis,
    do_fail_instance,
    do_place_many,
    do_wait_for_room,
    do_wait_for_room_many,
)
from models_app.models import Model, ModelInstance
from scheduler_app.estimate import EstimateError, ModelEstimate, estimate_model
from scheduler_app.eviction import make_room
from scheduler_app.pool import build_pool, read_pool
from scheduler_app.resources import WorkerResources
from scheduler_app.selectors.common import distributed_servers_for
from scheduler_app.session import PlacementResult, PlacementSession
from workers_app.backends import get_backend
from workers_app.models import Worker

logger = logging.getLogger(__name__)

__all__ = ["build_pool", "collector_paused", "find_placement", "pending_instance_ids", "schedule_instance",
           "schedule_instances"]


@contextmanager
def collector_paused() -> Iterator[None]:
    """No cyclic garbage collection while a pass runs: it makes objects by the ten thousand (a candidate per GPU), and
    each full collection walks everything the process holds, which at thousands of workers cost more than the pass.
    Reference counting still frees what is dropped; a collection runs again once the pass is over."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def find_placement(model: Model, est: ModelEstimate, workers: list[Worker] | None = None,
                   pool: list[WorkerResources] | None = None) -> PlacementResult:
    """A dry run against the cluster as it is now (evaluations): the given workers, else a pool read for it."""
    with collector_paused():
        if pool is None:
            pool = read_pool() if workers is None else list(build_pool(workers).values())
        return PlacementSession(pool).best(model, est)


def _claim_for_analysis(instance_ids: list[int]) -> list[ModelInstance]:
    """Take the still-pending ones in one transaction; rows another scheduler holds are skipped, not awaited."""
    with transaction.atomic():
        ids = list(ModelInstance.objects.select_for_update(skip_locked=True)
                   .filter(pk__in=instance_ids, state=InstanceState.PENDING).values_list("pk", flat=True))
        ids = do_begin_analysis(ids)
    instances = list(ModelInstance.objects.filter(pk__in=ids).order_by("id"))
    # One object per model, shared by its instances (a thousand replicas of one model: one row read, not a thousand).
    models = Model.objects.in_bulk({instance.model_id for instance in instances})
    instances = [instance for instance in instances if instance.model_id in models]  # the rest went with the model
    for instance in instances:
        instance.model = models[instance.model_id]
    return instances


def _estimates(instances: list[ModelInstance]) -> dict[int, ModelEstimate | EstimateError]:
    found: dict[int, ModelEstimate | EstimateError] = {}
    for instance in instances:
        model = instance.model
        if model.pk in found:
            continue
        try:
            found[model.pk] = est = estimate_model(model)
        except EstimateError as exc:
            found[model.pk] = exc
            continue
        except Exception as exc:  # one model's surprise must not strand the others of the pass
            logger.exception("estimating model %s failed", model.name)
            found[model.pk] = EstimateError(f"estimating failed: {type(exc).__name__}: {exc}", retry=True)
            continue
        changed = {}
        if not model.categories and est.categories:
            changed["categories"] = est.categories
        if not model.backend:
            changed["backend"] = est.backend
        if changed:  # remember what was detected, as the user would have written it
            Model.objects.filter(pk=model.pk).update(**changed)
    return found


def schedule_instances(instance_ids: list[int]) -> dict[int, str]:
    """Place these instances if they are pending. Returns each one's state afterwards. Whatever happens, none is
    left `analyzing`: an instance the pass could not finish goes back to pending (a killed scheduler's are
    returned by the stuck sweep)."""
    began = time.perf_counter()
    with collector_paused():
        instances = _claim_for_analysis(instance_ids)
        outcome: dict[int, str] = {}
        estimates: dict = {}
        try:
            estimates = _estimates(instances)
            _place_all(instances, estimates, outcome)
        finally:
            for instance in instances:
                if instance.pk not in outcome:
                    do_wait_for_room(instance, "scheduling was interrupted; asking again shortly", cause="interrupted")
    if instances:
        metrics.note_scheduler_pass(time.perf_counter() - began,
                                    sum(state == InstanceState.SCHEDULED for state in outcome.values()))
    if settings.EVICT_IDLE_MODELS:
        _make_room([(i, estimates[i.model_id]) for i in instances if outcome.get(i.pk) == InstanceState.PENDING
                    and isinstance(estimates.get(i.model_id), ModelEstimate)])
    return outcome


def _make_room(waiting: list[tuple[ModelInstance, ModelEstimate]]) -> None:
    """Instances left waiting for room: idle models may be put to sleep for them (scheduler_app.eviction)."""
    try:
        make_room(waiting)
    except Exception:  # the pass itself is done and written; making room is tried again on the next one
        logger.exception("making room for waiting instances failed")


@dataclass
class _Decision:
    """What the pass does with one instance: place it (`fields`, and the worker queues to tell), let it wait
    (`cause`), or refuse it for good (`refused`)."""
    message: str
    fields: dict | None = None
    queues: list[str] = field(default_factory=list)
    cause: str = "no_fit"
    refused: bool = False
    explanation: dict | None = None


def _decide(instance: ModelInstance, est, session: PlacementSession) -> _Decision:
    if isinstance(est, EstimateError):
        if est.retry:
            return _Decision(f"{est}; asking again shortly", cause="hub_unreachable")
        return _Decision(str(est), refused=True)
    result = session.place(instance.model, est)
    chosen = result.candidate
    if chosen is None:
        return _Decision(result.message, explanation=result.explanation())
    version = instance.model.backend_version or get_backend(est.backend).default_version
    explanation = result.explanation()  # scores as they were when chosen
    session.book(chosen)
    return _Decision(result.message, fields={
        "worker": chosen.resources.worker, "gpu_indexes": chosen.gpu_indexes, "computed_resource_claim": chosen.claim,
        "distributed_servers": distributed_servers_for(chosen), "backend": est.backend, "backend_version": version,
        "placement_explanation": explanation},
        # its parts' workers start their RPC servers first
        queues=list(dict.fromkeys([chosen.resources.worker.queue,
                                   *(s.resources.worker.queue for s in chosen.subordinates)])))


def _place_all(instances: list[ModelInstance], estimates: dict, outcome: dict[int, str]) -> None:
    """Decide every instance against the pool in memory (each booking seen by the next), then write the decisions
    in one go: the placements in one bulk update, the instances that wait in one transition per reason."""
    placements: list[tuple[ModelInstance, str, dict]] = []
    waiting: dict[tuple[str, str], list[int]] = {}
    explanations: dict[tuple[str, str], dict | None] = {}
    queues: dict[int, list[str]] = {}
    with transaction.atomic():
        # Lock the workers (in id order) so concurrent schedulers never book the same free memory twice.
        session = PlacementSession(read_pool([i.pk for i in instances], lock=True))
        for instance in instances:
            try:
                decision = _decide(instance, estimates[instance.model_id], session)
            except Exception as exc:  # one instance's surprise must not strand the others of the pass
                logger.exception("placing instance %s failed", instance.name)
                decision = _Decision(f"scheduling failed: {type(exc).__name__}: {exc}; asking again shortly",
                                     cause="scheduler_error")
            if decision.fields is not None:
                placements.append((instance, decision.message, decision.fields))
                queues[instance.pk] = decision.queues
            elif decision.refused:
                if do_fail_instance(instance, decision.message, from_states=[InstanceState.ANALYZING],
                                    permanent=True):
                    outcome[instance.pk] = InstanceState.ERROR
            else:
                waiting.setdefault((decision.message, decision.cause), []).append(instance.pk)
                explanations.setdefault((decision.message, decision.cause), decision.explanation)
        placed = do_place_many(placements)
        for (message, cause), ids in waiting.items():
            for pk in do_wait_for_room_many(ids, message, cause, explanations[(message, cause)]):
                outcome[pk] = InstanceState.PENDING
        by_queue: dict[str, list[int]] = {}
        for pk in placed:
            outcome[pk] = InstanceState.SCHEDULED
            for queue in queues[pk]:
                by_queue.setdefault(queue, []).append(pk)
        for instance in instances:
            outcome.setdefault(instance.pk, "gone")  # deleted (or taken back) while the pass ran
        transaction.on_commit(lambda: _send_launches(by_queue))


def _send_launches(by_queue: dict[str, list[int]]) -> None:
    """One message per worker queue, however many of its instances the pass placed. The same message apply_async
    sends, built directly: apply_async reads a dozen settings again for each message and its safe repr walks the
    arguments, which at a thousand workers cost more than the decisions."""
    from celery.utils import uuid

    from workers_app.tasks import launch_instances

    if not by_queue:
        return
    amqp, name = launch_instances.app.amqp, launch_instances.name
    with launch_instances.app.producer_or_acquire() as producer:  # one connection for the whole pass
        for queue, ids in by_queue.items():
            args = [sorted(ids)]  # a list of ids: its plain repr is what the worker's log shows
            message = amqp.create_task_message(uuid(), name, args, {}, argsrepr=repr(args), kwargsrepr="{}")
            amqp.send_task_message(producer, name, message, queue=queue)


def schedule_instance(instance_id: int) -> str:
    return schedule_instances([instance_id]).get(instance_id) or ModelInstance.objects.filter(
        pk=instance_id).values_list("state", flat=True).first() or "gone"


def pending_instance_ids() -> list[int]:
    return list(ModelInstance.objects.filter(state=InstanceState.PENDING).order_by("id").values_list("pk", flat=True))
