"""The instance lifecycle as a table: every move not in it is refused, every move made is in the history, a
scheduling pass that fails half-way strands nothing, and instances stuck without progress are placed again."""

from datetime import timedelta

import pytest
from django.utils import timezone

from models_app import actions, lifecycle
from models_app.choices import INSTANCE_TRANSITIONS, InstanceState
from models_app.models import ModelInstance
from scheduler_app import scheduler
from scheduler_app.scheduler import schedule_instances
from tests.factories import make_worker

pytestmark = pytest.mark.django_db
STATES = [s for s, _ in InstanceState.choices]


@pytest.fixture
def instance():
    model = actions.do_create_model(name="m", source="local_path", local_path="/m.gguf")
    return ModelInstance.objects.get(model=model)


@pytest.mark.parametrize(("source", "target"), [(a, b) for a in STATES for b in STATES
                                                if b not in INSTANCE_TRANSITIONS[a]])
def test_every_move_not_in_the_table_is_refused(instance, source, target):
    ModelInstance.objects.filter(pk=instance.pk).update(state=source)
    with pytest.raises(lifecycle.IllegalTransition, match=f"{source} → {target} is not a move"):
        lifecycle._transition(instance, target, cause="test", from_states=[source])
    assert ModelInstance.objects.get(pk=instance.pk).state == source


def test_a_move_from_a_state_the_instance_is_not_in_changes_nothing(instance):
    assert not lifecycle.do_mark_running(instance)  # it is pending, not starting
    assert ModelInstance.objects.get(pk=instance.pk).state == "pending" and not instance.events.exists()


def test_every_move_is_in_the_history_and_the_api(instance, api):
    worker = make_worker("w")
    lifecycle.do_begin_analysis([instance.pk])
    lifecycle.do_place(instance, "placed on w", worker=worker)
    lifecycle.do_begin_start(instance, "w")
    lifecycle.do_mark_running(instance)
    lifecycle.do_fail_instance(instance, "backend killed by signal SIGKILL", from_states=["running"])
    history = api.get(f"/api/v1/instances/{instance.pk}/events").json()
    assert [(e["from_state"], e["to_state"], e["cause"]) for e in history] == [
        ("pending", "analyzing", "analyzing"), ("analyzing", "scheduled", "placed"), ("scheduled", "starting", "start"),
        ("starting", "running", "healthy"), ("running", "error", "failed")]
    assert history[-1]["message"] == "backend killed by signal SIGKILL" and history[0]["time"]


def test_a_placement_that_raises_strands_nothing(monkeypatch):
    make_worker("w")
    actions.do_create_model(name="good", source="local_path", local_path="/g.gguf")
    bad = actions.do_create_model(name="bad", source="local_path", local_path="/b.gguf")
    real = scheduler._decide

    def flaky(instance, est, session):
        if instance.model_id == bad.pk:
            raise RuntimeError("a bug in one model's placement")
        return real(instance, est, session)

    monkeypatch.setattr(scheduler, "_decide", flaky)
    outcome = schedule_instances(list(ModelInstance.objects.values_list("pk", flat=True)))
    states = {i.model.name: (i.state, i.state_message) for i in ModelInstance.objects.select_related("model")}
    assert states["good"][0] == "scheduled" and sorted(outcome.values()) == ["pending", "scheduled"]
    assert states["bad"] == ("pending", "scheduling failed: RuntimeError: a bug in one model's placement; "
                                        "asking again shortly")


def test_a_pass_that_dies_returns_its_instances_to_pending(monkeypatch):
    make_worker("w")
    actions.do_create_model(name="m", source="local_path", local_path="/m.gguf", replicas=2)

    def broken(*args, **kwargs):
        raise ConnectionError("the database went away")

    monkeypatch.setattr(scheduler, "_place_all", broken)
    with pytest.raises(ConnectionError):
        schedule_instances(list(ModelInstance.objects.values_list("pk", flat=True)))
    assert set(ModelInstance.objects.values_list("state", flat=True)) == {"pending"}


def test_stuck_instances_are_placed_again_but_busy_ones_are_left_alone(instance, settings):
    worker = make_worker("w")
    quiet = actions.do_create_model(name="quiet", source="local_path", local_path="/q.gguf")
    [installing] = ModelInstance.objects.filter(model=quiet)
    long_ago = timezone.now() - timedelta(seconds=settings.STUCK_AFTER + 5)
    ModelInstance.objects.filter(pk=instance.pk).update(state="analyzing", updated_at=long_ago)
    ModelInstance.objects.filter(pk=installing.pk).update(state="initializing", worker=worker, updated_at=long_ago)
    lifecycle.do_note_alive([installing.pk])  # its worker says it is still installing
    assert lifecycle.do_sweep_stuck() == {"analyzing": 1}
    instance.refresh_from_db()
    assert instance.state == "pending" and "without progress" in instance.state_message
    assert ModelInstance.objects.get(pk=installing.pk).state == "initializing"


def test_old_history_is_pruned(instance):
    lifecycle.do_begin_analysis([instance.pk])
    instance.events.update(time=timezone.now() - timedelta(days=30))
    assert lifecycle.do_prune_events(keep_days=14) == 1 and not instance.events.exists()


WRITERS = {"models_app/lifecycle.py", "workers_app/actions.py"}  # the only modules that may write a state
WRITE_CALLS = {"update", "create", "bulk_create", "update_or_create", "get_or_create", "bulk_update"}


def _state_writes(path):
    """(line, what) for each write of a `state` field in one module: `x.state = …`, `….update(state=…)`,
    `…create(defaults={"state": …})`."""
    import ast

    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            found += [(node.lineno, "assignment") for t in targets
                      if isinstance(t, ast.Attribute) and t.attr == "state"]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in WRITE_CALLS:
            for keyword in node.keywords:
                if keyword.arg == "state":
                    found.append((node.lineno, f"{node.func.attr}(state=…)"))
                elif keyword.arg == "defaults" and isinstance(keyword.value, ast.Dict):
                    found += [(node.lineno, f"{node.func.attr}(defaults={{'state': …}})")
                              for key in keyword.value.keys
                              if isinstance(key, ast.Constant) and key.value == "state"]
    return found


def test_nothing_but_the_lifecycle_writes_a_state():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    offenders = []
    for package in ("aimind", "models_app", "workers_app", "scheduler_app", "gateway_app"):
        for path in (root / package).rglob("*.py"):
            relative = path.relative_to(root).as_posix()
            if "/migrations/" in relative or relative in WRITERS:
                continue
            offenders += [f"{relative}:{line} {what}" for line, what in _state_writes(path)]
    assert offenders == []
    assert _state_writes(root / "models_app/lifecycle.py"), "the check no longer recognises the lifecycle's writes"
