"""Spread puts replicas where the least is placed; binpack fills the fullest worker that still fits."""

import random

import pytest

from scheduler_app.resources import WorkerResources
from scheduler_app.scorers import best_gpu, score
from scheduler_app.selectors import Candidate
from workers_app.models import Worker

pytestmark = pytest.mark.django_db


def test_spread_places_three_replicas_on_three_workers(register, deploy, llama_8b):
    for name in ("a", "b", "c"):
        register(name, vram_gib=[24])
    instances = deploy(llama_8b, replicas=3, placement_strategy="spread")
    assert sorted(i.worker.name for i in instances) == ["a", "b", "c"]
    assert all(i.state == "scheduled" and i.gpu_indexes == [0] for i in instances)


def test_binpack_stacks_three_replicas_on_one_gpu(register, deploy, llama_8b):
    for name in ("a", "b", "c"):
        register(name, vram_gib=[24])
    instances = deploy(llama_8b, replicas=3, placement_strategy="binpack")
    assert {(i.worker.name, tuple(i.gpu_indexes)) for i in instances} == {("a", (0,))}


def test_spread_uses_every_gpu_of_a_worker_before_doubling_up(register, deploy, llama_8b):
    register("a", vram_gib=[24, 24, 24])
    instances = deploy(llama_8b, replicas=3)
    assert sorted(i.gpu_indexes[0] for i in instances) == [0, 1, 2]


def test_binpack_prefers_the_worker_already_in_use(register, deploy, llama_8b):
    register("a", vram_gib=[24])
    register("b", vram_gib=[24])
    deploy(llama_8b, name="first", placement_strategy="binpack")
    [second] = deploy(llama_8b, name="second", placement_strategy="binpack")
    assert second.worker.name == "a"


def test_ties_break_the_same_way_every_time(register, deploy, llama_8b):
    register("b", vram_gib=[24])
    register("a", vram_gib=[24])
    [instance] = deploy(llama_8b)
    assert instance.worker.name == "a"


def test_a_burst_never_double_books_a_gpu(register, deploy, llama_8b):
    register("a", vram_gib=[16])
    instances = deploy(llama_8b, replicas=4, cpu_offloading=False)
    placed = [i for i in instances if i.state == "scheduled"]
    assert len(placed) == 2  # two 8B replicas at ctx 8192 need ~12 GiB; a third would not fit in 16
    assert sum(int(i.computed_resource_claim["vram"]["0"]) for i in placed) <= 16 * 1024**3
    waiting = [i for i in instances if i.state == "pending"]
    assert len(waiting) == 2 and "largest free is" in waiting[0].state_message


@pytest.mark.parametrize("strategy", ["spread", "binpack"])
def test_a_worker_offers_the_gpu_a_score_of_all_its_gpus_would_rank_first(strategy):
    """The one-GPU selectors offer one candidate per worker (scorers.best_gpu): the one that would come first among
    all of its GPUs, so the pass chooses as it would from all of them."""
    rng = random.Random(7)
    for n in range(200):
        indexes = rng.sample(range(8), rng.randint(1, 8))  # in any order, as gpu_selector may name them
        counts = {i: rng.choice([0, 0, 1, 2, 3]) for i in indexes}
        res = WorkerResources(Worker(id=n, name=f"w{n}"), ram_total=1, ram_free=1, gpu_total=dict.fromkeys(counts, 1),
                              gpu_free=dict.fromkeys(counts, 1), gpu_instance_count=counts)
        by_score = min((Candidate(res, [i], dict) for i in indexes), key=lambda c: score(c, strategy))
        assert best_gpu(res, indexes, strategy) == by_score.gpu_indexes[0]
