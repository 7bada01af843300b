"""Backend versions are honoured: two llama-box versions side by side on one worker, an unknown version refused
where the server can tell and otherwise an error on the instance, not retried; a model's env reaches its process."""

import time
from pathlib import Path

import httpx
import psutil
import pytest

# llama-cpp-python 0.3.30 vendors an older llama.cpp whose RPC binary is still named `rpc-server`.
OTHER_VERSION = "0.3.30"
DEFAULT_VERSION = "0.3.36"


def instances(system, model_id):
    with system.client() as c:
        return c.get(f"/api/v1/models/{model_id}/instances").json()


@pytest.mark.timeout(2400)  # a fresh machine compiles the older llama.cpp first (5 to 10 minutes on 2 cores)
def test_two_llama_box_versions_serve_side_by_side(system, deploy):
    built = system.manage("install_backend", "llama-box", "--version", OTHER_VERSION, timeout=1800)
    assert f"llama-box {OTHER_VERSION} (cpu)" in built
    assert "already installed" in system.manage("install_backend", "llama-box", "--version", OTHER_VERSION)
    default = deploy("default-version", backend="llama-box")
    older = deploy("older-version", backend="llama-box", backend_version=OTHER_VERSION)
    [a] = system.wait_for_instances(default["id"], "running")
    [b] = system.wait_for_instances(older["id"], "running")
    assert (a["backend"], a["backend_version"], b["backend_version"]) == ("llama-box", DEFAULT_VERSION, OTHER_VERSION)
    assert a["worker_name"] == b["worker_name"]
    assert f"/llama-box/{DEFAULT_VERSION}/cpu/bin/llama-server" in psutil.Process(a["pid"]).exe()
    assert f"/llama-box/{OTHER_VERSION}/cpu/bin/llama-server" in psutil.Process(b["pid"]).exe()
    with system.client() as c:
        for name in ("default-version", "older-version"):
            reply = c.post("/v1/chat/completions", json={"model": name, "max_tokens": 4,
                                                         "messages": [{"role": "user", "content": "hi"}]})
            assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"], reply.text


def test_a_version_the_package_index_does_not_list_is_refused_at_deploy(deploy):
    refused = deploy("no-such-version", expect=400, backend="llama-box", backend_version="0.0.999")
    assert refused["backend_version"] == [
        "llama-box version '0.0.999' does not exist: the package index lists no llama-cpp-python==0.0.999"]


def test_an_unknown_version_the_server_could_not_check_errors_once_naming_it(system, deploy):
    model = deploy("unchecked-version", backend_version="0.0.999")  # backend left empty: the worker finds out
    [errored] = system.wait_for_instances(model["id"], "error", timeout=120)
    assert "llama-cpp-python==0.0.999 is not on the package index" in errored["state_message"]
    assert errored["error_kind"] == "permanent" and errored["next_restart_at"] is None
    assert not (Path(system.env["AIMIND_CACHE_DIR"]) / "backends" / "llama-box" / "0.0.999").exists()
    time.sleep(3)  # a crash restarts at once and again 2 s later here: a permanent error does neither
    [still] = instances(system, model["id"])
    assert (still["state"], still["restart_count"]) == ("error", 0)


def test_models_env_reaches_its_process_but_not_the_placement_variables(system, deploy):
    refused = deploy("gpu-thief", expect=400, env={"CUDA_VISIBLE_DEVICES": "3"})
    assert refused["env"] == ["CUDA_VISIBLE_DEVICES is set by aiMindServe from the placement and cannot be "
                              "overridden"]
    preloaded = deploy("preloader", expect=400, env={"LD_PRELOAD": "/tmp/evil.so"})
    assert "LD_PRELOAD would run code inside the backend" in preloaded["env"][0]
    model = deploy("with-env", env={"E2E_MARKER": "from the model", "OMP_NUM_THREADS": "1"})
    [running] = system.wait_for_instances(model["id"], "running")
    environ = psutil.Process(running["pid"]).environ()
    assert environ["E2E_MARKER"] == "from the model" and environ["OMP_NUM_THREADS"] == "1"
    assert environ["CUDA_VISIBLE_DEVICES"] == ""  # a CPU placement hides every GPU
    worker_only = ("REDIS_URL", "DATABASE_URL", "DJANGO_SETTINGS_MODULE")
    assert {k for k in environ if k.startswith("AIMIND_") or k in worker_only} == set()  # the worker's secrets
    assert httpx.get(f"http://127.0.0.1:{running['port']}/health", timeout=5).status_code == 200
