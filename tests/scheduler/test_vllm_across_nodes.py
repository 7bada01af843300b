"""vLLM across workers: tensor parallelism within a node and one pipeline stage per node (vLLM's multiprocessing
multi-node mode), placed only when no single worker holds the model; and the command line of each node."""

from pathlib import Path

import pytest

from tests.scheduler.conftest import gib
from tests.scheduler.test_vllm_and_vox_box_placement import hf_dir
from workers_app.backends.base import Installation, LaunchSpec, PartSpec, distributed_master_port
from workers_app.backends.vllm import VLLM

pytestmark = pytest.mark.django_db


def nodes(instance) -> list[tuple[str, list[int], int]]:
    main = [(instance.worker.name, instance.gpu_indexes, instance.computed_resource_claim["node_rank"])]
    return main + [(p["worker_name"], p["gpu_indexes"], p["computed_resource_claim"]["node_rank"])
                   for p in instance.distributed_servers]


def test_a_model_too_big_for_any_gpu_worker_spans_two_with_tp_inside_and_pp_across(tmp_path, register, deploy):
    for name in ("a", "b", "c"):
        register(name, vram_gib=[24, 24])
    [instance] = deploy(hf_dir(tmp_path, "llama-70b", 70))  # 70 GiB: not on two 24 GiB GPUs, on four
    assert instance.state == "scheduled", instance.state_message
    claim = instance.computed_resource_claim
    assert (claim["tensor_parallel_size"], claim["pipeline_parallel_size"]) == (2, 2)
    assert [(len(gpus), rank) for _, gpus, rank in nodes(instance)] == [(2, 0), (2, 1)]
    assert instance.worker.name != instance.distributed_servers[0]["worker_name"]
    sub = instance.distributed_servers[0]["computed_resource_claim"]
    assert {int(v) for v in sub["vram"].values()} == {int(0.9 * gib(24))}


def test_a_model_one_worker_holds_stays_on_it(tmp_path, register, deploy):
    register("a", vram_gib=[24, 24])
    register("b", vram_gib=[24, 24])
    [instance] = deploy(hf_dir(tmp_path, "big", 38))
    assert instance.distributed_servers == [] and len(instance.gpu_indexes) == 2


def test_cpu_only_workers_take_one_pipeline_stage_each(tmp_path, register, deploy):
    register("c1", ram_gib=12)
    register("c2", ram_gib=12)
    register("c3", ram_gib=12)
    [instance] = deploy(hf_dir(tmp_path, "m", 14))  # 14 GiB of weights + runtime: no 12 GiB worker alone
    assert instance.state == "scheduled", instance.state_message
    claim = instance.computed_resource_claim
    assert claim["pipeline_parallel_size"] == len(nodes(instance)) >= 2
    assert all(gpus == [] for _, gpus, _ in nodes(instance))
    assert claim["ram"] <= gib(12) and claim["kv_cache_bytes"] > 0


def test_off_for_the_model_means_one_worker_or_none(tmp_path, register, deploy):
    register("c1", ram_gib=12)
    register("c2", ram_gib=12)
    [instance] = deploy(hf_dir(tmp_path, "m", 14), distributed_inference_across_workers=False)
    assert instance.state == "pending" and "distributed inference: is off for this model" in instance.state_message


def test_gpu_and_cpu_workers_are_never_mixed(tmp_path, register, deploy):
    register("g", vram_gib=[24])
    register("c", ram_gib=12)
    [instance] = deploy(hf_dir(tmp_path, "m", 30))
    assert instance.state == "pending" and "never mixed" in instance.state_message


INSTALL = Installation("vllm", "0.32.0", "cpu", Path("/venv"), Path("/venv/bin/python"))


def test_the_main_is_node_rank_0_and_the_master():
    claim = {"tensor_parallel_size": 2, "pipeline_parallel_size": 2, "node_rank": 0, "gpu_memory_utilization": 0.9,
             "max_model_len": 4096}
    cmd = VLLM().command(LaunchSpec(model_name="m", model_path=Path("/m"), host="10.0.0.1", port=40001,
                                    categories=["llm"], gpu_indexes=[0, 1], claim=claim, installation=INSTALL,
                                    master_port=29531))
    flags = dict(zip(cmd[3::2], cmd[4::2], strict=False))
    text = " ".join(cmd)
    assert "--tensor-parallel-size 2 --pipeline-parallel-size 2 --distributed-executor-backend mp" in text
    assert "--nnodes 2 --node-rank 0 --master-addr 10.0.0.1 --master-port 29531" in text
    assert flags["--port"] == "40001" and "--headless" not in cmd


def test_a_subordinate_node_is_headless_with_its_rank_and_the_mains_address():
    claim = {"tensor_parallel_size": 1, "pipeline_parallel_size": 3, "node_rank": 2, "kv_cache_bytes": 64 << 20}
    cmd = VLLM().part_command(PartSpec(installation=INSTALL, host="10.0.0.3", port=40002, threads=2, index=1,
                                       claim=claim, model_name="m", model_path=Path("/m"), main_host="10.0.0.1",
                                       master_port=distributed_master_port(7, 1)))
    text = " ".join(cmd)
    assert cmd[1].endswith("workers_app/backends/vllm_cli.py") and cmd[2] == "serve"  # `vllm serve`: headless
    assert cmd[-1] == "--headless" and "--port" not in cmd
    assert f"--nnodes 3 --node-rank 2 --master-addr 10.0.0.1 --master-port {29500 + (7 * 31 + 1)}" in text
    assert "--kv-cache-memory-bytes 67108864" in text


def test_the_multi_node_flags_are_the_products_not_the_users():
    assert VLLM().check_parameters(["--node-rank", "1", "--headless"]) == [
        "--headless is set by aiMindServe and cannot be overridden",
        "--node-rank is set by aiMindServe and cannot be overridden"]


def test_nodes_talk_over_the_workers_own_address_and_its_interface():
    from workers_app.backends.vllm import network_environment

    assert network_environment("127.0.0.1") == {"VLLM_HOST_IP": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo",
                                                "NCCL_SOCKET_IFNAME": "lo"}
    assert network_environment("203.0.113.9") == {"VLLM_HOST_IP": "203.0.113.9"}  # not here: no interface named
