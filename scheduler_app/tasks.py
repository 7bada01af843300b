from celery import shared_task

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
