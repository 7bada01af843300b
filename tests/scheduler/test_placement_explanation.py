"""Why here: a placement keeps the chosen worker and GPUs with their score, and why the other workers lost (a lower
score, or why they could not take it, with numbers); an instance that waits keeps why nothing fits; evaluations
answer in the same form."""

import pytest

from models_app import actions
from models_app.models import Model, ModelInstance
from scheduler_app.api import evaluate_spec
from scheduler_app.scheduler import pending_instance_ids, schedule_instances
from scheduler_app.session import EXPLAINED_OTHERS


def others(explanation: dict) -> dict[str, str]:
    return {o["worker_name"]: o["reason"] for o in explanation["others"]}


def test_the_winner_its_score_and_each_losers_reason_are_kept(register, deploy, llama_8b, llama_70b):
    register("a", vram_gib=[24])
    register("b", vram_gib=[24])
    register("c", vram_gib=[4])
    register("d", vram_gib=[24], labels={"zone": "far"})
    [first] = deploy(llama_8b, name="first", cpu_offloading=False, worker_selector={"zone": "far"})
    why = first.placement_explanation
    assert first.worker.name == why["chosen"]["worker_name"] == "d" and why["others_count"] == 3
    assert others(why) == {name: "labels do not match zone=far" for name in "abc"}
    [too_big] = deploy(llama_70b, name="too-big", cpu_offloading=False, distributed_inference_across_workers=False)
    why = too_big.placement_explanation
    assert too_big.state == "pending" and why["chosen"] is None and why["others_count"] == 4
    assert all(reason.startswith("needs ") for reason in others(why).values()) and set(others(why)) == set("abcd")
    actions.do_delete_model(Model.objects.get(name="first"))

    [placed] = deploy(llama_8b, name="second", cpu_offloading=False)
    why = placed.placement_explanation
    assert why["strategy"] == "spread" and why["others_count"] == 3
    assert why["chosen"] == {"worker_name": "a", "gpu_indexes": [0], "score": 100.0}
    lost = others(why)
    assert lost["b"] == "same score (100.0); the chosen comes first by name"
    assert lost["c"].startswith("needs ") and "largest free is 4.0 GiB" in lost["c"]

    [next_one] = deploy(llama_8b, name="third", cpu_offloading=False)
    why = next_one.placement_explanation
    assert why["chosen"]["worker_name"] == "b"
    assert others(why)["a"] == "already runs 1 instance(s) on that GPU, the chosen 0 (spread prefers fewer)"
    api = ModelInstance.objects.get(pk=next_one.pk)
    assert api.placement_explanation == why


def test_binpack_says_the_fuller_worker_won(register, deploy, llama_8b):
    register("a", vram_gib=[24])
    register("b", vram_gib=[24])
    deploy(llama_8b, name="first", placement_strategy="binpack", cpu_offloading=False)
    [second] = deploy(llama_8b, name="second", placement_strategy="binpack", cpu_offloading=False)
    why = second.placement_explanation
    assert why["chosen"]["worker_name"] == "a" and why["chosen"]["score"] > 0
    assert others(why)["b"] == "already runs 0 instance(s) on that GPU, the chosen 1 (binpack prefers more)"


def test_a_big_cluster_names_a_few_and_counts_the_rest(register, llama_8b):
    for n in range(30):
        register(f"w{n:02d}", vram_gib=[24])
    actions.do_create_model(name="m", source="local_path", local_path=str(llama_8b), replicas=5)
    schedule_instances(pending_instance_ids())
    for instance in ModelInstance.objects.all():
        why = instance.placement_explanation
        assert why["others_count"] == 29 and 1 <= len(why["others"]) <= EXPLAINED_OTHERS
        assert instance.worker.name == why["chosen"]["worker_name"]


@pytest.mark.parametrize("fits", [True, False])
def test_an_evaluation_explains_in_the_same_form(register, llama_8b, fits):
    register("a", vram_gib=[24 if fits else 2])
    register("b", vram_gib=[2])
    result = evaluate_spec({"name": "eval", "source": "local_path", "local_path": str(llama_8b),
                            "cpu_offloading": False})
    why = result["placement_explanation"]
    assert result["compatible"] is fits and {"strategy", "chosen", "others", "others_count"} <= set(why)
    if fits:
        assert why["chosen"]["worker_name"] == result["placement"]["worker_name"] == "a"
        assert "largest free is 2.0 GiB" in others(why)["b"]
    else:
        assert why["chosen"] is None and set(others(why)) == {"a", "b"}
        assert why["across_workers"].startswith("across 2 GPU workers needs")


def test_an_instance_sent_back_to_waiting_forgets_why_it_was_there(register, deploy, llama_8b):
    from models_app import lifecycle

    register("a", vram_gib=[24])
    [placed] = deploy(llama_8b, name="m", cpu_offloading=False)
    assert placed.placement_explanation["chosen"]["worker_name"] == "a"
    lifecycle.do_unplace([placed.pk], "worker a was lost", cause="worker_lost")
    placed.refresh_from_db()
    assert placed.state == "pending" and placed.placement_explanation == {}
