from celery import shared_task

from models_app.actions import do_sleep_idle_models
from models_app.lifecycle import do_prune_events, do_sweep_stuck
from scheduler_app.scheduler import pending_instance_ids, schedule_instances


@shared_task(name="scheduler_app.tasks.schedule_instance", ignore_result=True)
def schedule_instance(instance_id: int) -> None:
    schedule_instances([instance_id])


@shared_task(name="scheduler_app.tasks.schedule_pending_instances", ignore_result=True)
def schedule_pending_instances() -> int:
    """Beat, worker joins and freed resources call this: everything pending gets one more try, in one pass."""
    ids = pending_instance_ids()
    if ids:
        schedule_instances(ids)
    return len(ids)


@shared_task(name="scheduler_app.tasks.sweep_stuck_instances", ignore_result=True)
def sweep_stuck_instances() -> dict[str, int]:
    return do_sweep_stuck()


@shared_task(name="scheduler_app.tasks.prune_instance_events", ignore_result=True)
def prune_instance_events() -> int:
    return do_prune_events()


@shared_task(name="scheduler_app.tasks.sleep_idle_models", ignore_result=True)
def sleep_idle_models() -> list[str]:
    """Beat: models idle for their `sleep_after_minutes` are put to sleep (their replicas stop)."""
    return do_sleep_idle_models()
