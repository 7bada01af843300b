from celery import shared_task

from scheduler_app.scheduler import pending_instance_ids
from scheduler_app.scheduler import schedule_instance as place


@shared_task(name="scheduler_app.tasks.schedule_instance", ignore_result=True)
def schedule_instance(instance_id: int) -> str:
    return place(instance_id)


@shared_task(name="scheduler_app.tasks.schedule_pending_instances", ignore_result=True)
def schedule_pending_instances() -> int:
    """Beat and worker (re-)registration call this: resources may have appeared."""
    ids = pending_instance_ids()
    for instance_id in ids:
        place(instance_id)
    return len(ids)
