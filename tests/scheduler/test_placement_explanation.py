"""Why here: a placement keeps the chosen worker and GPUs with their score, and why every other worker lost (a lower
score, or why it could not take it, with numbers): the first EXPLAINED_OTHERS by name, the rest counted in groups by
reason; an instance that waits keeps why nothing fits; evaluations answer in the same form."""

import pytest
from django.test import Client

from models_app import actions
from models_app.models import Model, ModelInstance
from scheduler_app.api import evaluate_spec
from scheduler_app.session import EXAMPLES, EXPLAINED_OTHERS
from tests.factories import cpu_status, gpu_status, make_worker


def others(explanation: dict) -> dict[str, str]:
    return {o["worker_name"]: o["reason"] for o in explanation["others"]}


def kinds(explanation: dict) -> list[tuple[str, str]]:
    return [(o["worker_name"], o["kind"]) for o in explanation["others"]]


def accounted(explanation: dict) -> int:
    """Every other worker once: by name, or in a group's count."""
    named = [o["worker_name"] for o in explanation["others"]]
    assert len(named) == len(set(named))
    for group in explanation["others_grouped"]:
        assert 1 <= len(group["examples"]) <= min(EXAMPLES, group["count"])
        assert not set(group["examples"]) & set(named)
    total = len(named) + sum(g["count"] for g in explanation["others_grouped"])
    assert total == explanation["others_count"]
    return total


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


def test_a_small_cluster_names_every_loser_with_its_reason(register, deploy, llama_8b):
    for name in "abcde":
        register(name, vram_gib=[24], labels={"zone": "x"})
    register("f", vram_gib=[2], labels={"zone": "x"})
    register("g", vram_gib=[24], labels={"zone": "y"})
    register("h", labels={"zone": "x"})  # no GPUs: the one-GPU selector has nothing to say of it
    fields = {"cpu_offloading": False, "worker_selector": {"zone": "x"}}
    [first] = deploy(llama_8b, name="first", **fields)
    why = first.placement_explanation
    assert why["chosen"]["worker_name"] == "a" and why["others_grouped"] == [] and accounted(why) == 7
    assert kinds(why) == [("b", "lower_score"), ("c", "lower_score"), ("d", "lower_score"), ("e", "lower_score"),
                          ("f", "did_not_fit"), ("h", "did_not_fit"), ("g", "filtered")]
    lost = others(why)
    assert all(lost[n] == "same score (100.0); the chosen comes first by name" for n in "bcde")
    assert [o["score"] for o in why["others"][:4]] == [100.0] * 4
    assert lost["f"].startswith("needs ") and "largest free is 2.0 GiB" in lost["f"]
    assert lost["h"] == "no placement there of the kind chosen (single_gpu)"
    assert lost["g"] == "labels do not match zone=x"

    [second] = deploy(llama_8b, name="second", **fields)
    why = second.placement_explanation
    assert why["chosen"]["worker_name"] == "b" and accounted(why) == 7
    assert [name for name, kind in kinds(why) if kind == "lower_score"] == ["c", "d", "e", "a"]
    assert others(why)["a"] == "already runs 1 instance(s) on that GPU, the chosen 0 (spread prefers fewer)"
    evaluated = evaluate_spec({"name": "eval", "source": "local_path", "local_path": str(llama_8b), **fields})
    now = evaluated["placement_explanation"]
    assert now["chosen"]["worker_name"] == "c" and accounted(now) == 7
    assert kinds(now) == [("d", "lower_score"), ("e", "lower_score"), ("a", "lower_score"), ("b", "lower_score"),
                          ("f", "did_not_fit"), ("h", "did_not_fit"), ("g", "filtered")]
    assert [others(now)[n] for n in "fhg"] == [lost[n] for n in "fhg"]


@pytest.mark.django_db
def test_a_worker_filled_in_the_same_pass_says_what_no_longer_fits(deploy, llama_8b):
    for name in "ab":
        make_worker(name, status=gpu_status([8]))  # room for one 8B each
    make_worker("c", status=gpu_status([24]))
    instances = deploy(llama_8b, replicas=4, cpu_offloading=False)
    assert [i.worker.name if i.worker else None for i in instances] == ["a", "b", "c", "c"]
    third = instances[2].placement_explanation
    assert kinds(third) == [("a", "did_not_fit"), ("b", "did_not_fit")] and accounted(third) == 2
    assert all(reason.startswith("needs ") and "largest free is" in reason for reason in others(third).values())
    again = evaluate_spec({"name": "eval", "source": "local_path", "local_path": str(llama_8b),
                           "cpu_offloading": False})["placement_explanation"]
    assert [(o["worker_name"], o["reason"]) for o in again["others"]] == [
        (o["worker_name"], o["reason"]) for o in third["others"]]  # as a fresh look says it


@pytest.mark.django_db
def test_a_big_cluster_names_up_to_the_cap_and_groups_the_rest(deploy, llama_8b, admin_user):
    fitting = EXPLAINED_OTHERS + 6
    for n in range(fitting):
        make_worker(f"w{n:03d}", status=gpu_status([24]), labels={"zone": "x"})
    for n in range(7):
        make_worker(f"small{n}", status=gpu_status([2 + n % 2]), labels={"zone": "x"})
    for n in range(4):
        make_worker(f"far{n}", status=gpu_status([24]), labels={"zone": "y"})
    make_worker("cpu", status=cpu_status(), labels={"zone": "x"})
    instances = deploy(llama_8b, replicas=3, cpu_offloading=False, worker_selector={"zone": "x"})
    assert [i.worker.name for i in instances] == ["w000", "w001", "w002"]
    for instance in instances:
        why = instance.placement_explanation
        assert accounted(why) == fitting + 7 + 4 + 1 - 1 and len(why["others"]) == EXPLAINED_OTHERS
        assert {kind for _, kind in kinds(why)} == {"lower_score"}
        groups = {(g["kind"], g["reason"].split()[0]): g for g in why["others_grouped"]}
        assert len(groups) == len(why["others_grouped"]) == 4
        assert groups[("lower_score", "could")]["count"] == fitting - 1 - EXPLAINED_OTHERS
        small = groups[("did_not_fit", "needs")]  # 2 or 3 GiB free: alike but for the figures, so one group
        assert small["count"] == 7 and small["figures_differ"] and small["examples"] == ["small0", "small1", "small2"]
        assert small["reason"].endswith("VRAM on 1 GPU, largest free is 2.0 GiB")  # as for its first example
        far = groups[("filtered", "labels")]
        assert far["count"] == 4 and not far["figures_differ"] and far["examples"] == ["far0", "far1", "far2"]
        assert far["reason"] == "labels do not match zone=x"
        assert groups[("did_not_fit", "no")] == {
            "kind": "did_not_fit", "reason": "no placement there of the kind chosen (single_gpu)", "count": 1,
            "examples": ["cpu"], "figures_differ": False}
    first = instances[0].placement_explanation
    assert [o["worker_name"] for o in first["others"]] == [f"w{n:03d}" for n in range(1, EXPLAINED_OTHERS + 1)]
    next_in_rank = [f"w{n:03d}" for n in range(EXPLAINED_OTHERS + 1, EXPLAINED_OTHERS + 1 + EXAMPLES)]
    assert first["others_grouped"][0]["examples"] == next_in_rank
    client = Client()
    client.force_login(admin_user)
    page = client.get(f"/instances/{instances[0].pk}/").content.decode()
    assert all(f"<tr><td>{name}</td>" in page for name in [o["worker_name"] for o in first["others"]])
    assert (f"5 more workers: could take it, but ranks below the chosen (spread) (e.g. {', '.join(next_in_rank)})"
            in page)
    assert "7 more workers: needs " in page
    assert "(as for small0; the figures differ) (e.g. small0, small1, small2)" in page
    assert "4 more workers: labels do not match zone=x (e.g. far0, far1, far2)" in page
    assert f"{accounted(first)} other workers in all." in page
    zh = client.get(f"/instances/{instances[0].pk}/", HTTP_ACCEPT_LANGUAGE="zh-CN").content.decode()
    assert "另有 4 个工作节点：labels do not match zone=x (例如 far0, far1, far2)" in zh
    assert "另有 7 个工作节点：needs " in zh
    assert "（以 small0 为例；各节点的数字不同） (例如 small0, small1, small2)" in zh

    third = instances[2].placement_explanation  # w000 and w001 hold one each: last in rank, so in the group
    assert [o["worker_name"] for o in third["others"]] == [f"w{n:03d}" for n in range(3, EXPLAINED_OTHERS + 3)]
    assert third["others_grouped"][0]["examples"] == [f"w{n:03d}" for n in range(EXPLAINED_OTHERS + 3,
                                                                                  EXPLAINED_OTHERS + 3 + EXAMPLES)]


@pytest.mark.parametrize("fits", [True, False])
def test_an_evaluation_explains_in_the_same_form(register, llama_8b, fits):
    register("a", vram_gib=[24 if fits else 2])
    register("b", vram_gib=[2])
    result = evaluate_spec({"name": "eval", "source": "local_path", "local_path": str(llama_8b),
                            "cpu_offloading": False})
    why = result["placement_explanation"]
    assert result["compatible"] is fits
    assert {"strategy", "chosen", "others", "others_grouped", "others_count"} <= set(why)
    assert accounted(why) == 2 - fits
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


def test_a_placement_across_workers_names_the_workers_running_its_parts(register, deploy, llama_70b):
    register("a", vram_gib=[24])
    register("b", vram_gib=[24])
    register("c", vram_gib=[24])
    [big] = deploy(llama_70b, cpu_offloading=False)  # about 42 GiB: across two of them
    why = big.placement_explanation
    assert [s["worker_name"] for s in big.distributed_servers] == ["b"] and why["chosen"]["worker_name"] == "a"
    assert kinds(why) == [("b", "takes_part"), ("c", "did_not_fit")] and accounted(why) == 2
    assert others(why)["b"] == "runs part of the chosen placement (across workers)"
    assert others(why)["c"].startswith("needs ") and "largest free is 24.0 GiB" in others(why)["c"]
