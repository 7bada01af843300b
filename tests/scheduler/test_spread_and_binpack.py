"""Spread puts replicas where the least is placed; binpack fills the fullest worker that still fits."""

import pytest

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
