"""The scheduler reads the cluster in two queries and keeps what it parsed between passes, keyed by the content it
read: whatever changed since (a reservation, an inventory, labels, another instance placed, a worker gone or silent),
the next placement and the next evaluation see it; and one pass decides as a fresh look after every placement would."""

import gc
import random
from datetime import timedelta

import pytest
from django.db.models.signals import post_init
from django.utils import timezone

from models_app import actions
from models_app.models import Model, ModelInstance
from scheduler_app.api import evaluate_spec
from scheduler_app.estimate import ModelEstimate, estimate_model
from scheduler_app.filters import filter_workers
from scheduler_app.pool import build_pool, read_pool
from scheduler_app.resources import WorkerResources
from scheduler_app.scheduler import collector_paused, schedule_instances
from scheduler_app.scorers import score
from scheduler_app.selectors import Candidate, Reasons, select_candidates
from scheduler_app.selectors.common import per_worker
from scheduler_app.session import PlacementSession
from tests.factories import gpu_status, make_worker
from workers_app import actions as worker_actions
from workers_app.models import Worker

GIB = 1024**3


def free(name: str) -> WorkerResources:
    return next(res for res in read_pool() if res.worker.name == name)


def spec(path, **fields) -> dict:
    return {"name": "eval", "source": "local_path", "local_path": str(path), **fields}


@pytest.mark.django_db
def test_a_smaller_reservation_is_seen_by_the_next_placement(register, deploy, llama_8b):
    register("a", vram_gib=[24], system_reserved={"vram": 20 * GIB})
    assert free("a").gpu_total == {0: 4 * GIB}  # read once: the parse is kept
    [waiting] = deploy(llama_8b, name="first", cpu_offloading=False)
    assert waiting.state == "pending" and "largest free is 4.0 GiB" in waiting.state_message
    worker_actions.do_update_worker(Worker.objects.get(name="a"), {"system_reserved": {"vram": 2 * GIB}})
    assert free("a").gpu_total == {0: 22 * GIB}
    [placed] = deploy(llama_8b, name="second", cpu_offloading=False)
    assert placed.state == "scheduled" and placed.worker.name == "a"


def test_an_instance_placed_by_someone_else_is_counted(register, llama_8b, db):
    register("a", vram_gib=[24])
    before = free("a")
    assert before.gpu_free == {0: 24 * GIB} and before.instance_count == 0
    model = actions.do_create_model(name="m", source="local_path", local_path=str(llama_8b), replicas=2)
    claim = {"ram": GIB, "vram": {"0": 5 * GIB}}
    ModelInstance.objects.filter(model=model).update(state="running", worker=Worker.objects.get(name="a"),
                                                     computed_resource_claim=claim)
    after = free("a")  # two instances with the same claim text: both counted
    assert after.gpu_free == {0: 14 * GIB} and after.ram_free == before.ram_free - 2 * GIB
    assert after.instance_count == 2 and after.gpu_instance_count == {0: 2}


def test_an_evaluation_sees_the_placement_made_since_the_last_one(register, deploy, llama_8b):
    register("a", vram_gib=[24])
    register("b", vram_gib=[24])
    assert evaluate_spec(spec(llama_8b))["placement"]["worker_name"] == "a"
    [placed] = deploy(llama_8b)
    assert placed.worker.name == "a"
    assert evaluate_spec(spec(llama_8b))["placement"]["worker_name"] == "b"  # spread: a already holds one


@pytest.mark.django_db
def test_a_new_inventory_and_new_labels_are_seen():
    worker = make_worker("a", status=gpu_status([24]))
    assert free("a").gpu_total == {0: 24 * GIB}
    worker_actions.do_heartbeat(worker, gpu_status([24, 48], ram_gib=128))
    now = free("a")
    assert now.gpu_total == {0: 24 * GIB, 1: 48 * GIB} and now.ram_total == 128 * GIB
    worker_actions.do_update_worker(Worker.objects.get(pk=worker.pk), {"labels": {"rack": "7"}})
    model = Model(name="m", worker_selector={"rack": "7"})
    assert [res.worker.name for res in filter_workers(model, read_pool(), Reasons())] == ["a"]


@pytest.mark.django_db
def test_a_silent_worker_is_left_out_though_its_row_is_otherwise_the_same():
    worker = make_worker("a", status=gpu_status([24]))
    assert free("a").heartbeat_fresh
    Worker.objects.filter(pk=worker.pk).update(last_heartbeat_at=timezone.now() - timedelta(days=1))
    reasons = Reasons()
    assert filter_workers(Model(name="m"), read_pool(), reasons) == []
    assert reasons.by_worker["a"] == ["has not sent a heartbeat recently"]


@pytest.mark.django_db
def test_a_deleted_worker_leaves_the_pool():
    make_worker("a", status=gpu_status([24]))
    gone = make_worker("b", status=gpu_status([24]))
    assert [res.worker.name for res in read_pool()] == ["a", "b"]
    worker_actions.do_delete_worker(gone)
    assert [res.worker.name for res in read_pool()] == ["a"]


def test_the_pool_read_for_a_pass_matches_the_workers_as_loaded(register, deploy, llama_8b, llama_70b):
    register("a", vram_gib=[24], labels={"rack": "1"}, system_reserved={"ram": 4 * GIB})
    register("b", vram_gib=[24], ram_gib=128)
    register("c", vram_gib=[8, 8])
    deploy(llama_70b, name="big", cpu_offloading=False)  # across a and b: b's RPC server claims on b
    [refused, excluded] = deploy(llama_8b, name="small", replicas=2)
    ModelInstance.objects.filter(pk=refused.pk).update(state="error", error_kind="permanent")
    assert ModelInstance.objects.exclude(distributed_servers=[]).exists()
    read = read_pool([excluded.pk])
    loaded = build_pool(list(Worker.objects.order_by("id")), [excluded.pk])
    assert [res.worker.id for res in read] == list(loaded)
    for res in read:
        other = loaded[res.worker.id]
        for field in ("ram_total", "ram_free", "gpu_total", "gpu_free", "instance_count", "gpu_instance_count",
                      "booked", "heartbeat_fresh", "gpu_order", "capacity"):
            assert getattr(res, field) == getattr(other, field), (res.worker.name, field)
        for field in ("id", "name", "state", "labels", "system_reserved", "status"):
            assert getattr(res.worker, field) == getattr(other.worker, field), (res.worker.name, field)
        assert res.worker.last_heartbeat_at == other.worker.last_heartbeat_at  # not read by the pass: loaded on use
        assert (res.worker._state.adding, res.worker._state.db) == (False, other.worker._state.db)


@pytest.mark.django_db
def test_a_listener_to_workers_being_made_hears_of_the_pools_workers_too():
    make_worker("a", status=gpu_status([24]))
    heard = []

    def listener(sender, instance, **kwargs):
        heard.append(instance.name)

    post_init.connect(listener, sender=Worker)
    try:
        [res] = read_pool()
    finally:
        post_init.disconnect(listener, sender=Worker)
    assert heard == ["a"] and res.gpu_total == {0: 24 * GIB}


@pytest.mark.django_db
def test_a_heartbeat_that_changes_only_use_figures_keeps_the_parse_and_brings_what_others_hold():
    worker = make_worker("a", status=gpu_status([24, 24]))
    status = gpu_status([24, 24])
    status["cpu"]["utilization"] = 0
    status["gpus"][0]["memory"]["used_by_others"] = 3 * GIB
    worker_actions.do_heartbeat(worker, status)
    first = free("a")
    assert first.gpu_others == {0: 3 * GIB} and first.gpu_free == {0: 21 * GIB, 1: 24 * GIB}
    for beat, others in enumerate([GIB, 0, 5 * GIB], 1):  # what heartbeats change: use, and others' VRAM
        status["cpu"]["utilization"] = 10 * beat
        status["memory"]["used"] = beat * GIB
        status["gpus"][0]["memory"].update(used=beat * GIB + others, used_by_others=others)
        status["gpus"][1]["core"]["utilization"] = 20 * beat
        worker_actions.do_heartbeat(worker, status)
        now = free("a")
        assert now.worker.status is first.worker.status  # not parsed again
        assert now.gpu_others == ({0: others} if others else {})
        assert now.gpu_free == {0: 24 * GIB - others, 1: 24 * GIB} and now.gpu_total == first.gpu_total
    status["gpus"][1]["memory"]["total"] = 48 * GIB  # a new inventory: parsed again
    worker_actions.do_heartbeat(worker, status)
    now = free("a")
    assert now.worker.status is not first.worker.status and now.worker.status == status
    assert now.gpu_total == {0: 24 * GIB, 1: 48 * GIB} and now.gpu_free == {0: 19 * GIB, 1: 48 * GIB}


def _use_figures_out(node):
    """A status without its use figures (what a kept parse may hold from an earlier heartbeat)."""
    if isinstance(node, dict):
        return {k: _use_figures_out(v) for k, v in node.items()
                if not (k in ("used", "used_by_others", "utilization") and type(v) in (int, float))}
    if isinstance(node, list):
        return [_use_figures_out(v) for v in node]
    return node


def _heartbeat_status(rng: random.Random, gpus: list[int], ram_gib: int) -> dict:
    """A status as a worker may send it: its use figures new each time, in any form JSON allows, among strings and
    keys that look like them."""
    def figure():
        if rng.random() < 0.03:
            return rng.choice([None, True])  # not a number: such a worker is parsed every time
        return rng.choice([0, rng.randrange(1, 80 * GIB), -rng.randrange(1, GIB), rng.random() * 1e10, 1.5e9, 0.0])

    status = {"cpu": {"total": 8, "utilization": rng.choice([0, 12, 99.5])},
              "memory": {"total": ram_gib * GIB, "used": figure()}, "gpus": []}
    for index, total in enumerate(gpus):
        memory = {"total": total * GIB, "used": figure()}
        if index % 2 == 0 or rng.random() < 0.1:  # mostly the same GPUs report it
            memory["used_by_others"] = figure()
        status["gpus"].append({"index": index, "name": 'GPU "used": 5', "memory": memory,
                               "core": {"utilization": rng.randrange(101)}})
    status["backends"] = {"llama-box": {"installable": True, "reason": '{"used_by_others": 7, "used": 1}',
                                        "used": "n/a", "installed": ["0.3.36"]}}
    return status


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.django_db
def test_the_pool_read_after_heartbeats_matches_the_workers_as_loaded(seed):
    """Heartbeats change the use figures every time and the inventory now and then: what the pool reads, with its kept
    parses, is what a fresh parse of the rows gives."""
    rng = random.Random(seed)
    shapes = {make_worker(f"w{n}").pk: ([rng.choice([8, 24, 80]) for _ in range(n % 4)], 64) for n in range(6)}
    for _ in range(30):
        for pk, (gpus, ram_gib) in shapes.items():
            if rng.random() < 0.1:
                gpus.append(24)  # a new GPU: a new inventory
            if rng.random() < 0.8:
                Worker.objects.filter(pk=pk).update(status=_heartbeat_status(rng, gpus, ram_gib))
        read = read_pool()
        loaded = build_pool(list(Worker.objects.order_by("id")))
        for res in read:
            other = loaded[res.worker.id]
            for field in ("ram_total", "ram_free", "gpu_total", "gpu_free", "gpu_others", "gpu_order", "capacity"):
                assert getattr(res, field) == getattr(other, field), (res.worker.name, field)
            assert _use_figures_out(res.worker.status) == _use_figures_out(other.worker.status)


def test_the_garbage_collector_is_back_as_it_was_after_a_pass(db):
    schedule_instances([])
    assert gc.isenabled()
    gc.disable()
    try:
        with collector_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


def _random_pool(seed: int) -> list[WorkerResources]:
    """Workers of every shape, some already partly booked; built the same way for each of the two placers."""
    rng = random.Random(seed)
    pool = []
    for n in range(40):
        gpus = [rng.choice([6, 8, 12, 16, 24, 32]) for _ in range(rng.choice([0, 0, 1, 2, 2, 4]))]
        status = gpu_status(gpus, ram_gib=rng.choice([8, 16, 32, 64]))
        worker = Worker(id=n + 1, name=f"w{rng.randrange(1000):03d}-{n}", state="ready", status=status, labels={})
        res = WorkerResources(worker, ram_total=status["memory"]["total"], ram_free=status["memory"]["total"],
                              gpu_total={i: int(v * GIB) for i, v in enumerate(gpus)},
                              gpu_free={i: int(v * GIB) for i, v in enumerate(gpus)},
                              gpu_instance_count={i: 0 for i in range(len(gpus))})
        for _ in range(rng.choice([0, 0, 1, 3])):
            index = rng.randrange(len(gpus)) if gpus else None
            res.book({"ram": rng.randrange(2 * GIB), "vram": {} if index is None else
                      {str(index): rng.randrange(int(gpus[index] * GIB * 0.6))}})
        pool.append(res)
    return pool


def _placed(candidate) -> tuple:
    return (candidate.worker_name, candidate.gpu_indexes, candidate.claim,
            [(s.resources.worker.name, s.gpu_indexes, s.claim) for s in candidate.subordinates])


def _book(candidate) -> None:
    candidate.resources.book(candidate.claim)
    for subordinate in candidate.subordinates:
        subordinate.resources.book(subordinate.claim)


def _best_as_written(stage, found: list, strategy: str):
    """The pool-wide rules as the selectors state them — fewest GPUs (multi-GPU), most layers on GPU (partial
    offload) — then the strategy's score alone."""
    if stage.__name__ in ("multi_gpu", "gpus_on_one_worker"):
        least = min(len(c.gpu_indexes) for c in found)
        found = [c for c in found if len(c.gpu_indexes) == least]
    elif stage.__name__ == "partial_offload":
        most = max(c.offload_layers for c in found)
        found = [c for c in found if c.offload_layers == most]
    return min(found, key=lambda c: score(c, strategy)[1:])


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("strategy", ["spread", "binpack"])
def test_one_pass_places_as_a_fresh_look_after_every_placement_would(seed, strategy, llama_8b, llama_70b):
    models = [Model(id=n, name=name, source="local_path", local_path=str(path), placement_strategy=strategy, **more)
              for n, (name, path, more) in enumerate([("small", llama_8b, {}), ("big", llama_70b, {}),
                                                      ("small-gpu-only", llama_8b, {"cpu_offloading": False}),
                                                      ("big-gpu-only", llama_70b, {"cpu_offloading": False})], 1)]
    estimates = {m.pk: estimate_model(m) for m in models}
    asks = [models[n % 7 % 4] for n in range(80)]
    session = PlacementSession(_random_pool(seed))
    in_one_pass = []
    for model in asks:
        chosen = session.place(model, estimates[model.pk]).candidate
        in_one_pass.append(None if chosen is None else _placed(chosen))
        if chosen is not None:
            session.book(chosen)
    pool = _random_pool(seed)
    looked_afresh = []
    for model in asks:
        kept = filter_workers(model, pool, Reasons(), estimates[model.pk].backend)
        stage, found = select_candidates(model, estimates[model.pk], kept, Reasons())
        chosen = _best_as_written(stage, found, strategy) if found else None
        looked_afresh.append(None if chosen is None else _placed(chosen))
        if chosen is not None:
            _book(chosen)
    assert in_one_pass == looked_afresh
    pool = _random_pool(seed)
    dry_runs = []  # what an evaluation answers: a fresh session's best, without its heap
    for model in asks:
        chosen = PlacementSession(pool).best(model, estimates[model.pk]).candidate
        dry_runs.append(None if chosen is None else _placed(chosen))
        if chosen is not None:
            _book(chosen)
    assert dry_runs == in_one_pass
    assert sum(p is not None for p in in_one_pass) > 20  # the cluster took a good share before filling up


def test_a_placement_that_makes_an_earlier_selector_fit_starts_the_pipeline_over(monkeypatch):
    """Selectors are tried in order and the first that yields wins: when a placement leaves a worker that the earlier
    selector now takes (here: one for workers with little RAM left), the next placement is the earlier selector's."""
    def little_left(model, est, pool, reasons):
        return [Candidate(res, [], lambda: {"ram": GIB}) for res in pool if res.ram_free <= 10 * GIB]

    def eight_gib(model, est, pool, reasons):
        return [Candidate(res, [], lambda: {"ram": 8 * GIB}) for res in pool if res.ram_free >= 8 * GIB]

    little_left, eight_gib = per_worker(little_left), per_worker(eight_gib)
    monkeypatch.setattr("scheduler_app.selectors.pipeline", lambda backend: [little_left, eight_gib])
    monkeypatch.setattr("scheduler_app.session.pipeline", lambda backend: [little_left, eight_gib])
    pool = []
    for n, name in enumerate("ab", 1):
        worker = Worker(id=n, name=name, state="ready", status=gpu_status([], ram_gib=16), labels={})
        pool.append(WorkerResources(worker, ram_total=16 * GIB, ram_free=16 * GIB))
    session, model, est = PlacementSession(pool), Model(id=1, name="m"), ModelEstimate("llama-box", [])
    first = session.place(model, est).candidate
    assert (first.worker_name, first.claim) == ("a", {"ram": 8 * GIB})
    session.book(first)
    second = session.place(model, est).candidate  # a has 8 GiB left: the first selector's now
    assert (second.worker_name, second.claim) == ("a", {"ram": GIB})
