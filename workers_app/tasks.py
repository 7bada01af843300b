from __future__ import annotations

from datetime import timedelta

from celery import shared_task
from django.conf import settings
from django.db import transaction
from django.utils import timezone

from models_app.choices import InstanceState
from models_app.lifecycle import (
    do_lose_parts,
    do_mark_answering,
    do_mark_unreachable,
    do_move_off_lost_worker,
    instances_with_parts_on,
)
from models_app.models import ModelInstance
from workers_app.actions import do_mark_worker_not_ready
from workers_app.choices import WorkerState
from workers_app.models import Worker
from workers_app.probes import answering_instances


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
    """Workers silent for longer than WORKER_STALE_AFTER become not_ready. Their instances whose backends still answer
    the server's own health probe keep running (the gateway keeps sending them requests); the others become
    unreachable and, on the next run, if still unreachable on a worker still not ready and still not answering, are
    placed elsewhere. Each run probes again: nothing moves on one missed answer, and a kept backend that stops
    answering is lost then. A distributed instance with a part on the silent worker is placed again at once: an RPC
    server or a headless vLLM node has no health check to ask, and its main's says nothing of it."""
    lost = _still_lost()
    back = answering_instances(instance_ids=[pk for ids in lost.values() for pk in ids])
    do_mark_answering(back)
    for worker_name, ids in lost.items():
        do_move_off_lost_worker(worker_name, [pk for pk in ids if pk not in back])
    cutoff = timezone.now() - timedelta(seconds=settings.WORKER_STALE_AFTER)
    silent = list(Worker.objects.filter(last_heartbeat_at__lt=cutoff))
    if not silent:
        return 0
    serving = answering_instances(on_workers=[worker.pk for worker in silent])
    do_mark_answering(serving)
    for worker in silent:
        with transaction.atomic():
            if not Worker.objects.select_for_update().filter(pk=worker.pk, last_heartbeat_at__lt=cutoff).exists():
                continue  # a heartbeat came in meanwhile
            kept = ModelInstance.objects.filter(worker=worker, pk__in=serving).count()
            if do_mark_worker_not_ready(worker, cutoff, still_serving=kept):
                do_lose_parts(worker.name, instances_with_parts_on(worker.pk))
            do_mark_unreachable(worker.name, keep=serving)
    return len(silent)


def _still_lost() -> dict[str, list[int]]:
    lost: dict[str, list[int]] = {}
    for pk, worker_name in ModelInstance.objects.filter(state=InstanceState.UNREACHABLE).exclude(
            worker__state=WorkerState.READY).values_list("pk", "worker__name"):
        lost.setdefault(worker_name or "", []).append(pk)
    return lost
