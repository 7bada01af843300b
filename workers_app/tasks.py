from __future__ import annotations

from datetime import timedelta

from celery import shared_task
from django.conf import settings
from django.db import transaction
from django.utils import timezone

from models_app.choices import InstanceState
from models_app.lifecycle import do_lose_parts, do_mark_unreachable, do_move_off_lost_worker
from models_app.models import ModelInstance
from workers_app.actions import do_mark_worker_not_ready
from workers_app.choices import WorkerState
from workers_app.models import Worker


@shared_task(name="workers_app.tasks.launch_instance", ignore_result=True)
def launch_instance(instance_id: int) -> None:
    from workers_app.agent import current_agent

    current_agent().launch(instance_id)


@shared_task(name="workers_app.tasks.launch_instances", ignore_result=True)
def launch_instances(instance_ids: list[int]) -> None:
    """A scheduler pass placed these instances (or parts of them) on this worker: one message for them all."""
    from workers_app.agent import current_agent

    agent = current_agent()
    for instance_id in instance_ids:
        agent.launch(instance_id)


@shared_task(name="workers_app.tasks.sync_instances", ignore_result=True)
def sync_instances() -> None:
    """Something about this worker's instances or parts changed: look at the server's view now, not in a second."""
    from workers_app.agent import current_agent

    current_agent().sync_soon()


@shared_task(name="workers_app.tasks.stop_instance", ignore_result=True)
def stop_instance(instance_id: int) -> None:
    from workers_app.agent import current_agent

    current_agent().stop_instance(instance_id)


@shared_task(name="workers_app.tasks.mark_stale_workers", ignore_result=True)
def mark_stale_workers() -> int:
    """Workers silent for longer than WORKER_STALE_AFTER become not_ready and their instances unreachable; on the
    next run, instances still unreachable on a worker still not ready are placed elsewhere."""
    for worker_name, ids in _still_lost().items():
        do_move_off_lost_worker(worker_name, ids)
    cutoff = timezone.now() - timedelta(seconds=settings.WORKER_STALE_AFTER)
    stale = list(Worker.objects.filter(state=WorkerState.READY, last_heartbeat_at__lt=cutoff))
    for worker in stale:
        with transaction.atomic():
            if do_mark_worker_not_ready(worker, cutoff):
                do_mark_unreachable(worker.name)
                do_lose_parts(worker.name, worker.pk)
    return len(stale)


def _still_lost() -> dict[str, list[int]]:
    lost: dict[str, list[int]] = {}
    for pk, worker_name in ModelInstance.objects.filter(state=InstanceState.UNREACHABLE).exclude(
            worker__state=WorkerState.READY).values_list("pk", "worker__name"):
        lost.setdefault(worker_name or "", []).append(pk)
    return lost
