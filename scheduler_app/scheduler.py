"""Place instances: estimate → filter workers → select candidates → score → book the claim.

A pass places a batch of pending instances against one locked snapshot of the cluster, booking each
placement in memory before the next, so a burst never double-books a GPU and costs one read of the
cluster, not one per instance.
"""

from __future__ import annotations

import logging

from django.db import transaction

from models_app.choices import InstanceState
from models_app.lifecycle import do_begin_analysis, do_fail_instance, do_place, do_wait_for_room
from models_app.models import Model, ModelInstance
from scheduler_app.estimate import EstimateError, ModelEstimate, estimate_model
from scheduler_app.resources import WorkerResources, claims_by_worker, worker_resources
from scheduler_app.selectors.common import distributed_servers_for
from scheduler_app.session import PlacementResult, PlacementSession
from workers_app.backends import get_backend
from workers_app.models import Worker

logger = logging.getLogger(__name__)


def build_pool(workers: list[Worker], exclude_instance_ids: list[int] = ()) -> dict[int, WorkerResources]:
    placed = claims_by_worker(exclude_instance_ids)
    return {w.id: worker_resources(w, placed.get(w.id, [])) for w in workers}


def find_placement(model: Model, est: ModelEstimate, workers: list[Worker]) -> PlacementResult:
    """A dry run against the cluster as it is now (evaluations)."""
    return PlacementSession(workers, build_pool(workers)).place(model, est)


def _claim_for_analysis(instance_ids: list[int]) -> list[ModelInstance]:
    """Take the still-pending ones in one transaction; rows another scheduler holds are skipped, not awaited."""
    with transaction.atomic():
        ids = list(ModelInstance.objects.select_for_update(skip_locked=True)
                   .filter(pk__in=instance_ids, state=InstanceState.PENDING).values_list("pk", flat=True))
        ids = do_begin_analysis(ids)
    return list(ModelInstance.objects.select_related("model").filter(pk__in=ids).order_by("id"))


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
    instances = _claim_for_analysis(instance_ids)
    outcome: dict[int, str] = {}
    try:
        _place_all(instances, _estimates(instances), outcome)
    finally:
        for instance in instances:
            if instance.pk not in outcome:
                do_wait_for_room(instance, "scheduling was interrupted; asking again shortly", cause="interrupted")
    return outcome


def _place_all(instances: list[ModelInstance], estimates: dict, outcome: dict[int, str]) -> None:
    launches: list[tuple[int, str]] = []
    with transaction.atomic():
        # Lock the workers (in id order) so concurrent schedulers never book the same free memory twice.
        workers = list(Worker.objects.select_for_update().order_by("id"))
        session = PlacementSession(workers, build_pool(workers, [i.pk for i in instances]))
        for instance in instances:
            try:
                with transaction.atomic():  # a savepoint: one instance's failure leaves the others' work intact
                    outcome[instance.pk] = _place_one(instance, estimates[instance.model_id], session, launches)
            except Exception as exc:
                logger.exception("placing instance %s failed", instance.name)
                do_wait_for_room(instance, f"scheduling failed: {type(exc).__name__}: {exc}; asking again shortly",
                                 cause="scheduler_error")
                outcome[instance.pk] = InstanceState.PENDING

        def launch() -> None:
            from workers_app.tasks import launch_instance

            for instance_id, queue in launches:
                launch_instance.apply_async(args=[instance_id], queue=queue)

        transaction.on_commit(launch)


def _place_one(instance: ModelInstance, est, session: PlacementSession, launches: list) -> str:
    if isinstance(est, EstimateError):
        if est.retry:
            do_wait_for_room(instance, f"{est}; asking again shortly", cause="hub_unreachable")
            return InstanceState.PENDING
        do_fail_instance(instance, str(est), from_states=[InstanceState.ANALYZING], permanent=True)
        return InstanceState.ERROR
    result = session.place(instance.model, est)
    chosen = result.candidate
    if chosen is None:
        do_wait_for_room(instance, result.message)
        return InstanceState.PENDING
    version = instance.model.backend_version or get_backend(est.backend).default_version
    if not do_place(instance, result.message, worker=chosen.resources.worker, gpu_indexes=chosen.gpu_indexes,
                    computed_resource_claim=chosen.claim, distributed_servers=distributed_servers_for(chosen),
                    backend=est.backend, backend_version=version):
        return "gone"
    session.book(chosen)
    launches.append((instance.pk, chosen.resources.worker.queue))
    for queue in dict.fromkeys(s.resources.worker.queue for s in chosen.subordinates):
        launches.append((instance.pk, queue))  # its parts' workers start their RPC servers first
    return InstanceState.SCHEDULED


def schedule_instance(instance_id: int) -> str:
    return schedule_instances([instance_id]).get(instance_id) or ModelInstance.objects.filter(
        pk=instance_id).values_list("state", flat=True).first() or "gone"


def pending_instance_ids() -> list[int]:
    return list(ModelInstance.objects.filter(state=InstanceState.PENDING).order_by("id").values_list("pk", flat=True))
