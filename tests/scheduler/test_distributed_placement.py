"""A GGUF model no single worker holds is placed across workers (llama.cpp RPC): the fewest workers of one kind, every
layer once, each claim within its worker's free memory, and the subordinates' memory counted as taken."""

import json

import numpy as np
import pytest

from models_app.models import ModelInstance
from scheduler_app.estimate import read_header
from scheduler_app.estimators.gguf import (
    compute_buffer_bytes,
    estimate,
    estimate_split,
    kv_cache_bytes,
    model_info,
)
from scheduler_app.scheduler import build_pool
from tests.fixtures.tiny_gguf import write_tiny_llama
from tests.scheduler.conftest import gib
from workers_app.models import Worker

pytestmark = pytest.mark.django_db

CPU_40 = {"ram": gib(24), "vram": 0}  # a 64 GiB CPU worker with 40 GiB to give: too small for a 70B alone


def llamacpp_layers_per_device(n_layer: int, ngl: int, tensor_split: list[float]) -> list[int]:
    """llama.cpp's assignment (llama-model.cpp, float32): layer il >= i_gpu_start goes to the first device whose
    normalised prefix sum of -ts is above (il - i_gpu_start) / act_gpu_layers; the output layer is il = n_layer."""
    splits = np.cumsum(np.array(tensor_split, dtype=np.float32), dtype=np.float32)
    splits = splits / splits[-1]
    start, active = max(n_layer + 1 - ngl, 0), min(ngl, n_layer + 1)
    counts = [0] * len(tensor_split)
    for il in range(start, n_layer + 1):
        counts[int(np.searchsorted(splits, np.float32(il - start) / np.float32(active), side="right"))] += 1
    return counts


def servers(instance: ModelInstance) -> list[tuple[str, list[int]]]:
    return [(s["worker_name"], s["gpu_indexes"]) for s in instance.distributed_servers]


def assert_each_claim_fits(instance: ModelInstance, ram_free: dict[str, int], vram_free: dict[str, int]) -> None:
    parts = [(instance.worker.name, instance.computed_resource_claim)]
    parts += [(s["worker_name"], s["computed_resource_claim"]) for s in instance.distributed_servers]
    for name, claim in parts:
        assert claim["ram"] <= ram_free[name], name
        assert all(int(v) <= vram_free[name] for v in claim["vram"].values()), name


def test_70b_too_big_for_any_gpu_worker_runs_across_the_two_emptiest(register, deploy, llama_70b):
    register("a", vram_gib=[24])
    register("b", vram_gib=[24])
    register("c", vram_gib=[20])
    [instance] = deploy(llama_70b, cpu_offloading=False)
    claim = instance.computed_resource_claim
    assert instance.state == "scheduled"
    assert (instance.worker.name, instance.gpu_indexes) == ("a", [0])
    assert servers(instance) == [("b", [0])]
    [server] = instance.distributed_servers
    assert {k: server[k] for k in ("worker_id", "port", "pid", "state")} == {
        "worker_id": Worker.objects.get(name="b").id, "port": None, "pid": None, "state": "pending"}
    assert claim["offload_layers"] == claim["total_layers"] == 81
    # -ts: one weight per device, the RPC server first, then the main's GPU, which holds the output layer
    rpc_layers = server["computed_resource_claim"]["layers"]
    assert claim["tensor_split"] == [rpc_layers, claim["layers"]]
    assert sum(claim["tensor_split"]) == 81
    assert 35 <= rpc_layers <= 45
    assert_each_claim_fits(instance, {"a": gib(64), "b": gib(64)}, {"a": gib(24), "b": gib(24)})
    together = int(claim["vram"]["0"]) + int(server["computed_resource_claim"]["vram"]["0"])
    assert gib(40) < together < gib(44)  # 39.6 GiB of weights (token_embd stays on the main's CPU), KV, 2 buffers
    assert claim["ram"] < gib(1.5)  # the main's CPU keeps token_embd and a compute buffer


def test_the_fewest_workers_are_taken_emptiest_first(register, deploy, llama_70b):
    register("big", vram_gib=[16])
    register("mid", vram_gib=[15])
    register("small", vram_gib=[14])
    register("tiny", vram_gib=[8])
    register("huge-but-full", vram_gib=[16], system_reserved={"ram": 0, "vram": gib(15)})
    [instance] = deploy(llama_70b, cpu_offloading=False)
    assert instance.worker.name == "big"
    assert servers(instance) == [("mid", [0]), ("small", [0])]
    claim = instance.computed_resource_claim
    assert len(claim["tensor_split"]) == 3 and sum(claim["tensor_split"]) == 81
    assert_each_claim_fits(instance, dict.fromkeys(["big", "mid", "small"], gib(64)),
                           {"big": gib(16), "mid": gib(15), "small": gib(14)})


def test_a_subordinate_with_two_gpus_runs_one_rpc_server_per_gpu(register, deploy, llama_70b):
    register("a", vram_gib=[24])
    register("b", vram_gib=[12, 12])
    [instance] = deploy(llama_70b, cpu_offloading=False)
    assert instance.worker.name == "a"
    assert servers(instance) == [("b", [0]), ("b", [1])]
    claim = instance.computed_resource_claim
    assert len(claim["tensor_split"]) == 3
    assert [s["computed_resource_claim"]["layers"] for s in instance.distributed_servers] == claim["tensor_split"][:2]
    assert all(int(s["computed_resource_claim"]["vram"][str(s["gpu_indexes"][0])]) <= gib(12)
               for s in instance.distributed_servers)


def test_the_layer_counts_written_as_tensor_split_are_what_llamacpp_assigns(register, deploy, llama_70b):
    register("a", vram_gib=[16])
    register("b", vram_gib=[15])
    register("c", vram_gib=[14])
    [instance] = deploy(llama_70b, cpu_offloading=False)
    claim = instance.computed_resource_claim
    assert llamacpp_layers_per_device(80, claim["offload_layers"], claim["tensor_split"]) == claim["tensor_split"]


def test_split_prices_the_layers_llamacpp_gave_each_rpc_device(tmp_path):
    """Measured: 8 blocks + output, -ngl 5 -ts 1,2 → blocks 4, 5 on RPC0; 6, 7 and the output on RPC1."""
    assert llamacpp_layers_per_device(8, 5, [1, 2]) == [2, 3]
    info = model_info([read_header(write_tiny_llama(tmp_path / "t.gguf", n_layer=8, n_embd=256, n_ff=512))])
    split = estimate_split(info, cpu_blocks=4, device_layers=[2, 3], ctx_size=512)
    kv, compute = kv_cache_bytes(info, 512, 1), compute_buffer_bytes(info, 512)
    assert split.device_bytes == [sum(info.layer_bytes[4:6]) + 2 * kv + compute,
                                  sum(info.layer_bytes[6:8]) + 2 * kv + compute + info.output_bytes]
    cpu_only = estimate(info, ctx_size=512, offload_layers=0)
    on_cpu = sum(info.layer_bytes[4:]) + sum(info.layer_repack_bytes[4:]) + 4 * kv
    assert split.main_ram == cpu_only.ram - on_cpu - (0 if info.output_tied else info.output_bytes)
    assert split.offload_layers == 5


def test_one_device_split_costs_what_a_single_gpu_estimate_does(llama_70b):
    info = model_info([read_header(llama_70b)])
    for ngl in (81, 30):
        single = estimate(info, ctx_size=8192, offload_layers=ngl, gpu_count=1)
        split = estimate_split(info, cpu_blocks=81 - ngl, device_layers=[ngl], ctx_size=8192)
        assert (split.main_ram, split.device_bytes) == (single.ram, [single.vram[0]])


def test_without_distributed_inference_it_stays_pending_with_numbers(register, deploy, llama_70b):
    register("a", vram_gib=[24])
    register("b", vram_gib=[24])
    [instance] = deploy(llama_70b, cpu_offloading=False, distributed_inference_across_workers=False)
    assert instance.state == "pending" and instance.distributed_servers == []
    message = instance.state_message
    assert "a, b: needs 41.8 GiB VRAM on 1 GPU, largest free is 24.0 GiB; cpu_offloading is off" in message
    assert "distributed inference: is off for this model" in message


def test_too_little_memory_even_together_says_how_much(register, deploy, llama_70b):
    for name in "abc":
        register(name, vram_gib=[12])
    [instance] = deploy(llama_70b, cpu_offloading=False)
    assert instance.state == "pending"
    assert "a, b, c: needs 41.8 GiB VRAM on 1 GPU, largest free is 12.0 GiB" in instance.state_message
    assert "distributed inference: across 3 GPU workers needs 42.3 GiB VRAM, they have 36.0 GiB free" \
        in instance.state_message


def test_cpu_workers_share_the_blocks_and_the_main_keeps_the_first(register, deploy, llama_70b):
    register("a", ram_gib=64, system_reserved=CPU_40)
    register("b", ram_gib=64, system_reserved=CPU_40)
    register("c", ram_gib=64, system_reserved=CPU_40)
    [instance] = deploy(llama_70b)
    claim = instance.computed_resource_claim
    [server] = instance.distributed_servers
    assert (instance.worker.name, instance.gpu_indexes, claim["vram"]) == ("a", [], {})
    assert (server["worker_name"], server["gpu_indexes"], server["computed_resource_claim"]["vram"]) == ("b", [], {})
    cpu_blocks = claim["total_layers"] - claim["offload_layers"]
    assert cpu_blocks == claim["layers"] > 10  # the first blocks stay in the main's RAM
    assert claim["tensor_split"] == [server["computed_resource_claim"]["layers"]] == [claim["offload_layers"]]
    assert cpu_blocks + claim["offload_layers"] == 81
    assert_each_claim_fits(instance, {"a": gib(40), "b": gib(40)}, {})
    assert claim["ram"] + server["computed_resource_claim"]["ram"] > gib(41)  # 39.6 GiB weights + the main's repack


def test_gpu_and_cpu_workers_are_never_combined(register, deploy, llama_70b):
    register("gpu", vram_gib=[24], ram_gib=8)
    register("cpu", ram_gib=64, system_reserved=CPU_40)
    [instance] = deploy(llama_70b, cpu_offloading=False)
    assert instance.state == "pending" and instance.worker is None
    assert "distributed inference: needs 2 or more GPU workers with room, or 2 or more CPU-only workers" \
        in instance.state_message


def test_a_model_one_worker_holds_is_never_distributed(register, deploy, llama_8b, llama_70b):
    register("a", vram_gib=[24], ram_gib=128)
    register("b", vram_gib=[24], ram_gib=128)
    [small] = deploy(llama_8b, name="small")
    [offloaded] = deploy(llama_70b, name="big")  # partial offload on one worker beats two workers
    assert small.distributed_servers == [] and small.gpu_indexes == [0]
    assert offloaded.distributed_servers == [] and offloaded.computed_resource_claim["offload_layers"] < 81


def test_a_later_model_sees_the_subordinates_memory_as_taken(register, deploy, llama_8b, llama_70b):
    register("a", vram_gib=[24])
    register("b", vram_gib=[24])
    register("c", vram_gib=[8])
    [big] = deploy(llama_70b, name="big", cpu_offloading=False)
    assert (big.worker.name, servers(big)) == ("a", [("b", [0])])
    sub_claim = big.distributed_servers[0]["computed_resource_claim"]
    pool = build_pool(list(Worker.objects.order_by("id")))
    b = Worker.objects.get(name="b").id
    assert pool[b].gpu_free[0] == gib(24) - sub_claim["vram"]["0"]
    assert pool[b].ram_free == gib(64) - sub_claim["ram"]
    [small] = deploy(llama_8b, name="small", cpu_offloading=False)
    assert small.worker.name == "c"  # b would look empty, and win under spread, if its RPC server were not counted


def test_replicas_in_one_pass_take_disjoint_workers(register, deploy, llama_70b):
    for name in "abcd":
        register(name, vram_gib=[24])
    first, second = deploy(llama_70b, replicas=2, cpu_offloading=False)
    used = [{i.worker.name, *(s for s, _ in servers(i))} for i in (first, second)]
    assert used[0].isdisjoint(used[1]) and len(used[0]) == len(used[1]) == 2


def test_gpus_picked_on_two_workers_are_used_exactly(register, deploy, llama_8b):
    register("a", vram_gib=[24])
    register("b", vram_gib=[24, 24])
    [instance] = deploy(llama_8b, gpu_selector={"gpu_ids": ["a:0", "b:1"]})
    assert (instance.worker.name, instance.gpu_indexes, servers(instance)) == ("a", [0], [("b", [1])])
    assert sum(instance.computed_resource_claim["tensor_split"]) == 33


def test_gpus_picked_on_two_workers_without_distributed_inference_wait(register, deploy, llama_8b):
    register("a", vram_gib=[24])
    register("b", vram_gib=[24])
    [instance] = deploy(llama_8b, gpu_selector={"gpu_ids": ["a:0", "b:0"]}, distributed_inference_across_workers=False)
    assert instance.state == "pending"
    assert "distributed inference: the picked GPUs are on 2 workers, and it is off for this model" \
        in instance.state_message


def test_picked_gpus_too_small_together_say_how_much(register, deploy, llama_70b):
    register("a", vram_gib=[12, 24])
    register("b", vram_gib=[12])
    [instance] = deploy(llama_70b, gpu_selector={"gpu_ids": ["a:0", "b:0"]})
    assert instance.state == "pending"
    assert "distributed inference: across 2 GPU workers needs 42.0 GiB VRAM, they have 24.0 GiB free" \
        in instance.state_message


def test_evaluation_shows_the_servers_a_deployment_gets(api, register, deploy, llama_70b):
    register("a", vram_gib=[24])
    register("b", vram_gib=[24])
    response = api.post("/api/v1/evaluations", {"model_specs": [
        {"name": "big", "source": "local_path", "local_path": str(llama_70b), "cpu_offloading": False}]},
        format="json")
    assert response.status_code == 200, response.data
    [result] = json.loads(response.content)["results"]
    assert result["compatible"] is True
    [instance] = deploy(llama_70b, name="big", cpu_offloading=False)
    placement = result["placement"]
    assert placement["worker_name"] == instance.worker.name and placement["gpu_indexes"] == instance.gpu_indexes
    assert placement["computed_resource_claim"] == instance.computed_resource_claim
    def without_attempt(parts):  # an attempt is numbered when it is placed
        return [{k: v for k, v in p.items() if k != "attempt"} for p in parts]

    assert without_attempt(placement["distributed_servers"]) == without_attempt(instance.distributed_servers)
    assert [s["worker_name"] for s in placement["distributed_servers"]] == ["b"]
