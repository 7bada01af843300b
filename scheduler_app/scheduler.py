"""Place an instance: estimate → filter workers → select candidates → score → book the claim."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from django.db import transaction

from models_app.actions import do_set_instance_state
from models_app.choices import InstanceState
from models_app.models import Model, ModelInstance
from scheduler_app.estimate import EstimateError, ModelEstimate, estimate_model
from scheduler_app.filters import filter_workers
from scheduler_app.resources import claims_by_worker, worker_resources
from scheduler_app.scorers import best_candidate
from scheduler_app.selectors import Candidate, select_candidates
from workers_app.models import Worker

logger = logging.getLogger(__name__)


@dataclass
class PlacementResult:
    candidate: Candidate | None
    reasons: list[str] = field(default_factory=list)
    note: str = ""

    @property
    def message(self) -> str:
        if self.candidate is not None:
            return self.note
        if not self.reasons:
            return "no workers have registered yet"
        return "no worker fits: " + "; ".join(self.reasons)


def find_placement(model: Model, est: ModelEstimate, workers: list[Worker],
                   exclude_instance_id: int | None = None) -> PlacementResult:
    kept, reasons = filter_workers(model, workers)
    if not kept:
        return PlacementResult(None, reasons, est.note)
    placed = claims_by_worker([w.id for w in kept], exclude_instance_id)
    pool = [worker_resources(w, placed.get(w.id, [])) for w in kept]
    candidates, fit_reasons = select_candidates(model, est, pool)
    if not candidates:
        return PlacementResult(None, reasons + fit_reasons, est.note)
    return PlacementResult(best_candidate(candidates, model.placement_strategy), note=est.note)


def schedule_instance(instance_id: int) -> str:
    """Try to place one pending instance. Returns its state afterwards (for logs and tests)."""
    instance = ModelInstance.objects.select_related("model").filter(pk=instance_id).first()
    if instance is None:
        return "gone"
    if not do_set_instance_state(instance, InstanceState.ANALYZING, from_states=[InstanceState.PENDING],
                                 message="reading model metadata"):
        return instance.state  # someone else is placing it, or it is already placed
    model = instance.model
    try:
        est = estimate_model(model)
    except EstimateError as exc:
        do_set_instance_state(instance, InstanceState.ERROR, from_states=[InstanceState.ANALYZING], message=str(exc))
        return InstanceState.ERROR
    if not model.categories and est.categories:
        Model.objects.filter(pk=model.pk, categories=[]).update(categories=est.categories)
    with transaction.atomic():
        # Lock the workers (in id order) so concurrent schedulers never book the same free memory twice.
        workers = list(Worker.objects.select_for_update().order_by("id"))
        result = find_placement(model, est, workers, exclude_instance_id=instance.pk)
        if result.candidate is None:
            do_set_instance_state(instance, InstanceState.PENDING, from_states=[InstanceState.ANALYZING],
                                  message=result.message)
            return InstanceState.PENDING
        chosen = result.candidate
        applied = do_set_instance_state(
            instance, InstanceState.SCHEDULED, from_states=[InstanceState.ANALYZING], message=result.message,
            worker=chosen.resources.worker, gpu_indexes=chosen.gpu_indexes,
            computed_resource_claim=chosen.claim, distributed_servers=[],
        )
        if not applied:
            return "gone"
        queue = chosen.resources.worker.queue

        def launch() -> None:
            from workers_app.tasks import launch_instance

            launch_instance.apply_async(args=[instance.pk], queue=queue)

        transaction.on_commit(launch)
    return InstanceState.SCHEDULED


def pending_instance_ids() -> list[int]:
    return list(ModelInstance.objects.filter(state=InstanceState.PENDING).values_list("pk", flat=True))
