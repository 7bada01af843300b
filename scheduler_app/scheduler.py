"""Place instances: estimate → filter workers → select candidates → score → book the claim.

A pass places a batch of pending instances against one locked snapshot of the cluster, booking each
placement in memory before the next, so a burst never double-books a GPU and costs one read of the
cluster, not one per instance.
"""

from __future__ import annotations

import logging

from django.db import transaction
from django.utils import timezone

from models_app.actions import do_fail_instance, do_set_instance_state
from models_app.choices import InstanceState
from models_app.models import Model, ModelInstance
from scheduler_app.estimate import EstimateError, ModelEstimate, estimate_model
from scheduler_app.resources import WorkerResources, claims_by_worker, worker_resources
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
        ModelInstance.objects.filter(pk__in=ids, state=InstanceState.PENDING).update(
            state=InstanceState.ANALYZING, state_message="reading model metadata", updated_at=timezone.now())
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
        changed = {}
        if not model.categories and est.categories:
            changed["categories"] = est.categories
        if not model.backend:
            changed["backend"] = est.backend
        if changed:  # remember what was detected, as the user would have written it
            Model.objects.filter(pk=model.pk).update(**changed)
    return found


def schedule_instances(instance_ids: list[int]) -> dict[int, str]:
    """Place these instances if they are pending. Returns each one's state afterwards."""
    instances = _claim_for_analysis(instance_ids)
    estimates = _estimates(instances)
    outcome: dict[int, str] = {}
    launches: list[tuple[int, str]] = []
    with transaction.atomic():
        # Lock the workers (in id order) so concurrent schedulers never book the same free memory twice.
        workers = list(Worker.objects.select_for_update().order_by("id"))
        session = PlacementSession(workers, build_pool(workers, [i.pk for i in instances]))
        for instance in instances:
            est = estimates[instance.model_id]
            if isinstance(est, EstimateError):
                if est.retry:
                    do_set_instance_state(instance, InstanceState.PENDING, from_states=[InstanceState.ANALYZING],
                                          message=f"{est}; asking again shortly")
                else:
                    do_fail_instance(instance, str(est), from_states=[InstanceState.ANALYZING], permanent=True)
                outcome[instance.pk] = InstanceState.PENDING if est.retry else InstanceState.ERROR
                continue
            result = session.place(instance.model, est)
            chosen = result.candidate
            if chosen is None:
                do_set_instance_state(instance, InstanceState.PENDING, from_states=[InstanceState.ANALYZING],
                                      message=result.message)
                outcome[instance.pk] = InstanceState.PENDING
                continue
            if do_set_instance_state(instance, InstanceState.SCHEDULED, from_states=[InstanceState.ANALYZING],
                                     message=result.message, worker=chosen.resources.worker,
                                     gpu_indexes=chosen.gpu_indexes, computed_resource_claim=chosen.claim,
                                     distributed_servers=[], backend=est.backend,
                                     backend_version=instance.model.backend_version
                                     or get_backend(est.backend).default_version):
                session.book(chosen)
                launches.append((instance.pk, chosen.resources.worker.queue))
                outcome[instance.pk] = InstanceState.SCHEDULED
            else:
                outcome[instance.pk] = "gone"

        def launch() -> None:
            from workers_app.tasks import launch_instance

            for instance_id, queue in launches:
                launch_instance.apply_async(args=[instance_id], queue=queue)

        transaction.on_commit(launch)
    return outcome


def schedule_instance(instance_id: int) -> str:
    return schedule_instances([instance_id]).get(instance_id) or ModelInstance.objects.filter(
        pk=instance_id).values_list("state", flat=True).first() or "gone"


def pending_instance_ids() -> list[int]:
    return list(ModelInstance.objects.filter(state=InstanceState.PENDING).order_by("id").values_list("pk", flat=True))
