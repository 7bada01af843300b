"""Two web processes that get a request for the same sleeping model at the same moment both ask to wake it: its
replicas are created (and sent to the scheduler) once. Separate threads, separate database connections, real
transactions: the row lock and the conditional update keep them apart."""

import threading

import pytest
from django.db import connection

from models_app import actions
from models_app.models import Model, ModelInstance

pytestmark = pytest.mark.django_db(transaction=True)


class _Scheduled:
    """Stands in for the Celery task the wake sends once its transaction commits: notes the instance ids."""

    ids: list[int] = []

    @classmethod
    def delay(cls, instance_id):
        cls.ids.append(instance_id)


@pytest.mark.parametrize("wakers", [2, 4])
def test_concurrent_wakes_create_the_replicas_once(monkeypatch, wakers):
    monkeypatch.setattr("scheduler_app.tasks.schedule_instance", _Scheduled)
    _Scheduled.ids = []
    model = actions.do_create_model(name="sleepy", source="local_path", local_path="/m.gguf", replicas=2,
                                    sleep_after_minutes=5)
    actions.do_sleep_model(model, "test")
    assert not ModelInstance.objects.filter(model=model).exists()
    _Scheduled.ids = []

    start = threading.Barrier(wakers)
    woke: list[bool] = []
    failures: list[BaseException] = []

    def wake():
        try:
            start.wait(timeout=10)
            woke.append(actions.do_wake_model(model.pk))
        except BaseException as exc:  # reported below, with the thread's own error
            failures.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=wake) for _ in range(wakers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert not failures, failures
    assert sorted(woke) == [False] * (wakers - 1) + [True]
    ids = sorted(ModelInstance.objects.filter(model=model).values_list("pk", flat=True))
    assert len(ids) == 2
    assert sorted(_Scheduled.ids) == ids
    assert not Model.objects.get(pk=model.pk).asleep
