from __future__ import annotations

from datetime import timedelta

from celery import shared_task
from django.conf import settings
from django.db import transaction
from django.utils import timezone

from models_app.actions import do_move_off_lost_worker
from models_app.choices import ErrorKind, InstanceState
from models_app.models import ModelInstance
from workers_app.choices import WorkerState
from workers_app.models import Worker


@shared_task(name="workers_app.tasks.launch_instance", ignore_result=True)
def launch_instance(instance_id: int) -> None:
    from workers_app.agent import current_agent

    current_agent().launch(instance_id)


@shared_task(name="workers_app.tasks.stop_instance", ignore_result=True)
def stop_instance(instance_id: int) -> None:
    from workers_app.agent import current_agent

    current_agent().stop_instance(instance_id)


@shared_task(name="workers_app.tasks.mark_stale_workers", ignore_result=True)
def mark_stale_workers() -> int:
    """Workers silent for longer than WORKER_STALE_AFTER become not_ready; their instances unreachable."""
    cutoff = timezone.now() - timedelta(seconds=settings.WORKER_STALE_AFTER)
    stale = list(Worker.objects.filter(state=WorkerState.READY, last_heartbeat_at__lt=cutoff))
    for worker in stale:
        with transaction.atomic():
            if not Worker.objects.filter(pk=worker.pk, state=WorkerState.READY, last_heartbeat_at__lt=cutoff).update(
                    state=WorkerState.NOT_READY,
                    state_message=f"no heartbeat since {worker.last_heartbeat_at:%Y-%m-%d %H:%M:%S} UTC"):
                continue
            # A permanent error stays where it failed: it waits for an edit or a delete, not for another worker.
            lost = list(ModelInstance.objects.filter(worker=worker, state__in=[*InstanceState.on_worker(),
                                                                                InstanceState.ERROR])
                        .exclude(error_kind=ErrorKind.PERMANENT).values_list("pk", flat=True))
            ModelInstance.objects.filter(pk__in=lost).update(
                state=InstanceState.UNREACHABLE, state_message=f"worker {worker.name} is not ready")
            do_move_off_lost_worker(worker.name, lost)
    return len(stale)
