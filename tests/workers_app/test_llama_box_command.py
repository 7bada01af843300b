"""The llama-server command line: our flags, the estimate's context, and user parameters as llama.cpp takes them."""

from pathlib import Path

from workers_app.backends.base import LaunchSpec
from workers_app.backends.llama_box import LlamaBox


def spec(**overrides) -> LaunchSpec:
    fields = {"model_name": "m", "model_path": Path("/m.gguf"), "host": "127.0.0.1", "port": 40001,
              "categories": ["llm"], "gpu_indexes": [], "claim": {"offload_layers": 0, "ctx_size": 2048}}
    return LaunchSpec(**{**fields, **overrides})


def test_cpu_instance_gets_no_gpu_layers_and_the_estimated_context():
    cmd = LlamaBox().command(spec())
    assert cmd[cmd.index("-ngl") + 1] == "0"
    assert cmd[cmd.index("--ctx-size") + 1] == "2048"
    assert cmd[cmd.index("--port") + 1] == "40001"
    assert cmd[cmd.index("--alias") + 1] == "m"


def test_user_parameters_with_equals_are_split_and_win():
    cmd = LlamaBox().command(spec(backend_parameters=["--ctx-size=512", "--threads", "2", "--no-mmap"]))
    assert "--ctx-size=512" not in cmd
    assert cmd.count("--ctx-size") == 1
    assert cmd[cmd.index("--ctx-size") + 1] == "512"
    assert cmd[-4:] == ["--ctx-size", "512", "--threads", "2", "--no-mmap"][-4:]


def test_embedding_and_reranker_models_get_their_endpoints():
    assert "--embeddings" in LlamaBox().command(spec(categories=["embedding"]))
    assert "--rerank" in LlamaBox().command(spec(categories=["reranker"]))


def test_gpu_instance_offloads_the_claimed_layers():
    cmd = LlamaBox().command(spec(gpu_indexes=[1], claim={"offload_layers": 33, "ctx_size": 8192}))
    assert cmd[cmd.index("-ngl") + 1] == "33"
    assert LlamaBox().environment(spec(gpu_indexes=[1]))["CUDA_VISIBLE_DEVICES"] == "1"


def test_prompt_cache_is_off_unless_asked_for():
    assert LlamaBox().command(spec())[-2:] == ["--cache-ram", "0"]
    asked = LlamaBox().command(spec(backend_parameters=["--cache-ram", "512"]))
    assert asked.count("--cache-ram") == 1 and asked[asked.index("--cache-ram") + 1] == "512"


def test_exit_cause_is_the_last_line_that_reads_like_an_error():
    backend = LlamaBox()
    assert backend.error_from_log(["loading", "error: invalid argument: --no-such-flag", "usage: ..."]) == \
        "error: invalid argument: --no-such-flag"
    assert backend.error_from_log(["main: server is listening on http://127.0.0.1:4000"]) == ""
