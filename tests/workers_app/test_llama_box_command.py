"""The llama-server command line: our flags, the estimate's context, and user parameters as llama.cpp takes them."""

from pathlib import Path

import pytest

from workers_app.backends.base import Installation, LaunchSpec, PartSpec
from workers_app.backends.llama_box import LlamaBox

HELP = "usage: llama-server [options]\n  -m, --model FNAME\n  -c, --ctx-size N\n  -ngl, --n-gpu-layers N\n"


def fake_server(directory: Path, help_text: str) -> Installation:
    """A stand-in llama-server that only answers --help, as the named build would."""
    server = directory / "llama-server"
    server.write_text(f"#!/bin/sh\ncat <<'EOF'\n{help_text}EOF\n")
    server.chmod(0o755)
    return Installation("llama-box", "0.3.36", "cpu", directory, server)


@pytest.fixture(scope="module")
def installation(tmp_path_factory):
    return fake_server(tmp_path_factory.mktemp("llama"), HELP + "  -cram, --cache-ram N\n")


@pytest.fixture
def spec(installation):
    def spec(**overrides) -> LaunchSpec:
        fields = {"model_name": "m", "model_path": Path("/m.gguf"), "host": "127.0.0.1", "port": 40001,
                  "categories": ["llm"], "gpu_indexes": [], "claim": {"offload_layers": 0, "ctx_size": 2048},
                  "installation": installation}
        return LaunchSpec(**{**fields, **overrides})

    return spec


def test_cpu_instance_gets_no_gpu_layers_and_the_estimated_context(spec, installation):
    cmd = LlamaBox().command(spec())
    assert cmd[0] == str(installation.entry)
    assert cmd[cmd.index("-ngl") + 1] == "0"
    assert cmd[cmd.index("--ctx-size") + 1] == "2048"
    assert cmd[cmd.index("--port") + 1] == "40001"
    assert cmd[cmd.index("--alias") + 1] == "m"


def test_user_parameters_with_equals_are_split_and_win(spec):
    cmd = LlamaBox().command(spec(backend_parameters=["--ctx-size=512", "--threads", "2", "--no-mmap"]))
    assert "--ctx-size=512" not in cmd
    assert cmd.count("--ctx-size") == 1
    assert cmd[cmd.index("--ctx-size") + 1] == "512"
    assert cmd[-4:] == ["--ctx-size", "512", "--threads", "2", "--no-mmap"][-4:]


def test_embedding_and_reranker_models_get_their_endpoints(spec):
    assert "--embeddings" in LlamaBox().command(spec(categories=["embedding"]))
    assert "--rerank" in LlamaBox().command(spec(categories=["reranker"]))


def test_gpu_instance_offloads_the_claimed_layers(spec):
    cmd = LlamaBox().command(spec(gpu_indexes=[1], claim={"offload_layers": 33, "ctx_size": 8192}))
    assert cmd[cmd.index("-ngl") + 1] == "33"
    assert LlamaBox().environment(spec(gpu_indexes=[1]))["CUDA_VISIBLE_DEVICES"] == "1"


def test_prompt_cache_is_off_unless_asked_for(spec):
    assert LlamaBox().command(spec())[-2:] == ["--cache-ram", "0"]
    asked = LlamaBox().command(spec(backend_parameters=["--cache-ram", "512"]))
    assert asked.count("--cache-ram") == 1 and asked[asked.index("--cache-ram") + 1] == "512"


def test_an_older_build_without_the_prompt_cache_flag_is_not_given_it(spec, tmp_path):
    older = fake_server(tmp_path, HELP)
    assert "--cache-ram" not in LlamaBox().command(spec(installation=older))


def test_unknown_claim_offloads_every_layer_with_llama_cpps_own_context(spec):
    cmd = LlamaBox().command(spec(gpu_indexes=[0], claim={"ram": 0, "vram": {"0": 0}, "offload_layers": 1,
                                                         "total_layers": 0, "ctx_size": None, "unknown": True}))
    assert cmd[cmd.index("-ngl") + 1] == "999"
    assert "--ctx-size" not in cmd
    users = LlamaBox().command(spec(gpu_indexes=[0], claim={"unknown": True}, backend_parameters=["-ngl", "10"]))
    assert users.count("-ngl") == 1 and users[users.index("-ngl") + 1] == "10"


def test_exit_cause_is_the_last_line_that_reads_like_an_error():
    backend = LlamaBox()
    assert backend.error_from_log(["loading", "error: invalid argument: --no-such-flag", "usage: ..."]) == \
        "error: invalid argument: --no-such-flag"
    assert backend.error_from_log(["main: server is listening on http://127.0.0.1:4000"]) == ""


def test_a_distributed_main_names_its_rpc_servers_first_and_splits_by_their_layers(spec):
    claim = {"offload_layers": 5, "total_layers": 9, "tensor_split": [3.0, 2.0], "ctx_size": 512}
    cmd = LlamaBox().command(spec(claim=claim, rpc_servers=["10.0.0.2:50052", "10.0.0.3:50052"]))
    assert cmd[cmd.index("--rpc") + 1] == "10.0.0.2:50052,10.0.0.3:50052"
    assert cmd[cmd.index("-ngl") + 1] == "5"
    assert cmd[cmd.index("--tensor-split") + 1] == "3,2"


def test_a_subordinate_runs_the_builds_rpc_server_on_its_own_address(installation, tmp_path):
    rpc = tmp_path / "ggml-rpc-server"
    rpc.write_text("#!/bin/sh\n")
    rpc.chmod(0o755)
    build = Installation("llama-box", "0.3.36", "cpu", tmp_path, installation.entry)
    part = PartSpec(installation=build, host="10.0.0.2", port=50052, threads=2, env={"CUDA_VISIBLE_DEVICES": "3"})
    assert LlamaBox().part_command(part) == [str(rpc), "-H", "10.0.0.2", "-p", "50052", "-t", "2"]
    assert LlamaBox().part_environment(part) == {"CUDA_VISIBLE_DEVICES": ""}  # the placement's, not the model's
