"""A model on one worker against the same model split over two (llama.cpp RPC), on a real cluster on this machine.

    sudo .venv/bin/python bench/distributed.py [--rounds 3] [--requests 8] [--max-tokens 64]

Starts `manage.py server` on a bridge and two workers in network namespaces of their own (as tests/e2e/cluster.py
does; root is needed), then prints:
- how long a worker takes to join: from `manage.py worker` starting to the worker `ready` in the API;
- tokens/s of the tiny model (8 blocks, 512 wide, random weights, 68 MB) through the gateway, with the model on
  one worker, then split across the two (each worker's reserved RAM raised until neither holds it alone);
- time from a `kill -9` of the subordinate's RPC server to the first chat answered again (the group restarts).
Single requests one after another (closed loop, one client); medians of the rounds. The machine is shared: compare
the two rows of one run, not runs with each other.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.e2e.cluster import Network, start_worker, stop_worker  # noqa: E402
from tests.e2e.system import fresh_cache, start_system, wait_until  # noqa: E402
from tests.fixtures.tiny_gguf import write_tiny_llama  # noqa: E402

CTX = ["--ctx-size", "512"]


def instance(c: httpx.Client, model_id: int) -> dict:
    return c.get(f"/api/v1/models/{model_id}/instances").json()[0]


def serving(c: httpx.Client, model_id: int, split: bool, timeout: float = 300) -> dict:
    def ready():
        i = instance(c, model_id)
        parts_ready = all(p["state"] == "ready" for p in i["distributed_servers"])
        return i if i["state"] == "running" and bool(i["distributed_servers"]) == split and parts_ready else None

    return wait_until(ready, timeout, "the model to serve", interval=0.2)


def chat(c: httpx.Client, max_tokens: int) -> int:
    answer = c.post("/v1/chat/completions", timeout=300, json={
        "model": "tiny-big", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": max_tokens,
        "temperature": 0, "ignore_eos": True})
    answer.raise_for_status()
    return answer.json()["usage"]["completion_tokens"]


def tokens_per_second(c: httpx.Client, requests: int, max_tokens: int) -> float:
    chat(c, max_tokens)  # warm
    started, tokens = time.perf_counter(), 0
    for _ in range(requests):
        tokens += chat(c, max_tokens)
    return tokens / (time.perf_counter() - started)


def deploy(c: httpx.Client, path: Path, distributed: bool) -> int:
    created = c.post("/api/v1/models", json={"name": "tiny-big", "source": "local_path", "local_path": str(path),
                                             "backend_parameters": CTX, "replicas": 1,
                                             "distributed_inference_across_workers": distributed})
    created.raise_for_status()
    return created.json()["id"]


def delete(c: httpx.Client, model_id: int) -> None:
    c.delete(f"/api/v1/models/{model_id}")
    wait_until(lambda: not c.get("/api/v1/models").json(), 60, "the model to go")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="aimind-bench-distributed-"))
    model = write_tiny_llama(tmp / "tiny-big.gguf", n_layer=8, n_embd=512, n_ff=2048, n_head=8, seed=3,
                             name="tiny-big")
    network = Network()
    server = None
    try:
        (tmp / "server").mkdir()
        # Each kill is a first failure (restarted at once): a restart that served a second is forgiven (the
        # workers judge that).
        server = start_system(tmp / "server", command="server", host=network.server_address,
                              extra_env={"AIMIND_RESTART_RESET_AFTER": "1"})
        cache = fresh_cache(tmp)
        joins = []
        with server.client() as c:
            for name in ("one", "two"):
                host = network.add_host(name, tmp)
                started = time.perf_counter()
                start_worker(server, host, cache, extra_env={"AIMIND_RESTART_RESET_AFTER": "1"})
                wait_until(lambda n=name: any(w["name"] == n and w["state"] == "ready"
                                              for w in c.get("/api/v1/workers").json()), 60, f"{name} to join",
                           interval=0.05)
                joins.append(time.perf_counter() - started)
            workers = {w["name"]: w for w in c.get("/api/v1/workers").json()}

            local = []
            for _ in range(args.rounds):
                model_id = deploy(c, model, distributed=False)
                serving(c, model_id, split=False)
                local.append(tokens_per_second(c, args.requests, args.max_tokens))
                claim = instance(c, model_id)["computed_resource_claim"]["ram"]
                delete(c, model_id)

            for w in workers.values():  # 3/4 of the model's claim free on each: only the two together hold it
                reserved = w["status"]["memory"]["total"] - claim * 3 // 4
                c.patch(f"/api/v1/workers/{w['id']}", json={"system_reserved": {"ram": reserved}}).raise_for_status()
            split, recoveries = [], []
            model_id = deploy(c, model, distributed=True)
            for _ in range(args.rounds):
                current = serving(c, model_id, split=True)
                wait_until(lambda: instance(c, model_id)["restart_count"] == 0, 30, "the restarts to be forgiven")
                split.append(tokens_per_second(c, args.requests, args.max_tokens))
                pid = current["distributed_servers"][0]["pid"]
                killed = time.perf_counter()
                os.kill(pid, signal.SIGKILL)
                wait_until(lambda p=pid: instance(c, model_id)["distributed_servers"][0]["pid"] not in (p, None)
                           and instance(c, model_id)["state"] == "running", 120, "the restart", interval=0.05)
                chat(c, 1)
                recoveries.append(time.perf_counter() - killed)
            delete(c, model_id)
        cpu = psutil.cpu_count()
        print(f"\n{cpu} CPU cores; tiny model: 8 blocks x 512, 68 MB; {args.requests} requests x "
              f"{args.max_tokens} tokens per round, {args.rounds} rounds, medians\n")
        print("| | tokens/s | ratio |")
        print("|---|---|---|")
        base = statistics.median(local)
        print(f"| one worker | {base:.1f} | 1.00 |")
        print(f"| split over two workers (RPC over veth) | {statistics.median(split):.1f} | "
              f"{statistics.median(split) / base:.2f} |")
        print(f"\nworker join (process start -> ready): {', '.join(f'{j:.2f} s' for j in joins)}")
        print(f"subordinate RPC server kill -9 -> chat answered again: median {statistics.median(recoveries):.2f} s "
              f"({', '.join(f'{r:.2f}' for r in recoveries)})")
    finally:
        for host in network.hosts:
            stop_worker(host)
        if server is not None:
            server.stop()
        network.destroy()


if __name__ == "__main__":
    main()
