"""The /v1 gateway's cost: the tiny model behind llama-server, asked directly and through aiMindServe's /v1, with the
same closed-loop httpx client, in the same run, rounds interleaved.

    .venv/bin/python bench/gateway.py [--rounds 5] [--seconds 3] [--web-workers 1[,2,...]] [--rate-limited]

Each row is one load (plain or streamed chat completions, max_tokens 16; 1 or 8 requests in flight): requests per
second and the median latency (streamed: the time to the first chunk), both as medians over the rounds. Goal: at 8
in flight the gateway keeps >= 0.90 of direct throughput; at 1 it adds <= 2 ms to the median. With --rate-limited,
a third target: the gateway with a key whose requests and tokens per minute and tokens per day are limited (too
high ever to refuse), so every request runs the limits' Redis script and adds its tokens after the answer; its rows
show what that costs beside the unlimited key.

llama-server closes the connection after each streamed answer without saying so (httpx then fails the next request
on it), so streamed requests ask for `Connection: close`, to both targets alike. Measurements are 1 s apart: the
gateway's idle connections to the backend (each holds one of llama-server's HTTP threads) close after 0.5 s.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.product import deploy as deploy_model  # noqa: E402
from tests.e2e.system import start_system  # noqa: E402
from tests.fixtures.tiny_gguf import write_tiny_llama  # noqa: E402

MODEL = "bench-tiny"
NEVER_REACHED = {"requests_per_minute": 1_000_000_000, "tokens_per_minute": 1_000_000_000,
                 "tokens_per_day": 1_000_000_000}
PARAMETERS = ["--parallel", "8", "-t", "2", "--ctx-size", "2048"]
LOADS = [(mode, c) for mode in ("plain", "streamed") for c in (1, 8)]


async def closed_loop(url: str, key: str, stream: bool, concurrency: int, seconds: float) -> tuple[float, float, int]:
    """(requests per second, median latency in ms (streamed: to the first chunk), requests) with `concurrency`
    clients that each send the next request when the last one is answered."""
    body = {"model": MODEL, "max_tokens": 16, "temperature": 0, "stream": stream,
            "messages": [{"role": "user", "content": "hello"}]}
    latencies: list[float] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {key}"}, timeout=30, limits=limits) as client:
        deadline = time.perf_counter() + seconds

        async def one_client() -> None:
            while time.perf_counter() < deadline:
                began = time.perf_counter()
                if stream:
                    async with client.stream("POST", url, json=body, headers={"Connection": "close"}) as response:
                        first = None
                        async for _ in response.aiter_raw():
                            first = first or time.perf_counter()
                        assert response.status_code == 200, response.status_code
                    latencies.append(first - began)
                else:
                    response = await client.post(url, json=body)
                    assert response.status_code == 200, response.text
                    latencies.append(time.perf_counter() - began)

        began = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(concurrency)))
        elapsed = time.perf_counter() - began
    return len(latencies) / elapsed, statistics.median(latencies) * 1000, len(latencies)


def cpu_seconds(processes: list[psutil.Process]) -> float:
    return sum(p.cpu_times().user + p.cpu_times().system for p in processes)


def deploy(system, model: Path) -> tuple[str, str]:
    """The model running; (its llama-server's chat URL, the backend's own key)."""
    instance = deploy_model(system, MODEL, model, PARAMETERS)
    key = psutil.Process(instance["pid"]).environ()["LLAMA_API_KEY"]
    return f"http://127.0.0.1:{instance['port']}/v1/chat/completions", key


def limited_key(system) -> str:
    with system.client() as c:
        issued = c.post("/api/v1/keys", json={"name": "bench limited", "scope": "inference", **NEVER_REACHED})
        assert issued.status_code == 201, issued.text
    return issued.json()["key"]


def measure(web_workers: int, rounds: int, seconds: float, rate_limited: bool = False) -> dict:
    with tempfile.TemporaryDirectory(prefix="aimind-bench-") as tmp:
        tmp_path = Path(tmp)
        model = write_tiny_llama(tmp_path / "tiny.gguf")
        # The product's own intervals (the tests' shorter ones make the worker ask the web server 6 times a second).
        product_intervals = {"AIMIND_HEARTBEAT_INTERVAL": "5", "AIMIND_HEALTH_CHECK_INTERVAL": "1"}
        system = start_system(tmp_path, extra_env={"AIMIND_WEB_WORKERS": str(web_workers), **product_intervals})
        try:
            direct_url, backend_key = deploy(system, model)
            targets = {"direct": (direct_url, backend_key),
                       "gateway": (f"{system.base_url}/v1/chat/completions", system.api_key)}
            if rate_limited:
                targets["limited"] = (targets["gateway"][0], limited_key(system))
            web = [p for p in psutil.Process(system.popen.pid).children(recursive=True)
                   if "uvicorn" in " ".join(p.cmdline()) or "spawn_main" in " ".join(p.cmdline())]
            results: dict = {}
            for url, key in targets.values():  # warm both (connections, the gateway's tables, llama's caches)
                asyncio.run(closed_loop(url, key, False, 8, 1.0))
            for n in range(rounds):
                for mode, c in LOADS:
                    order = list(targets) if n % 2 == 0 else list(reversed(targets))
                    for target in order:
                        url, key = targets[target]
                        time.sleep(1.0)
                        used, began = cpu_seconds(web), time.perf_counter()
                        rps, p50, count = asyncio.run(closed_loop(url, key, mode == "streamed", c, seconds))
                        results.setdefault((mode, c, target), []).append(
                            (rps, p50, count, cpu_seconds(web) - used, time.perf_counter() - began))
                print(f"round {n + 1}/{rounds} done", file=sys.stderr)
        finally:
            system.stop()
    return results


def table(results: dict, web_workers: int, rounds: int) -> str:
    """Medians over the rounds; `ratio` and `added` are medians of each round's pair (direct and gateway measured
    back to back), which a busy neighbour disturbs less than the medians' ratio. `web CPU`: the web processes' CPU
    time per request through the gateway, less what they used meanwhile when asked nothing (the direct runs)."""
    lines = [f"\nweb workers: {web_workers}; medians of {rounds} rounds (latency: streamed = time to first chunk)",
             f"{'load':<14} {'direct rps':>10} {'gateway rps':>11} {'ratio':>6} {'direct p50':>11} "
             f"{'gateway p50':>12} {'added':>8} {'web CPU':>9}"]
    for mode, c in LOADS:
        direct, gateway = results[(mode, c, "direct")], results[(mode, c, "gateway")]
        d_rps, g_rps = statistics.median(r[0] for r in direct), statistics.median(r[0] for r in gateway)
        d_p50, g_p50 = statistics.median(r[1] for r in direct), statistics.median(r[1] for r in gateway)
        ratio = statistics.median(g[0] / d[0] for d, g in zip(direct, gateway, strict=True))
        added = statistics.median(g[1] - d[1] for d, g in zip(direct, gateway, strict=True))
        idle = sum(d[3] for d in direct) / sum(d[4] for d in direct)  # web CPU seconds per second, unasked
        cpu = statistics.median((g[3] - idle * g[4]) / g[2] * 1e6 for g in gateway)
        lines.append(f"{mode + ' c=' + str(c):<14} {d_rps:>10.1f} {g_rps:>11.1f} {ratio:>6.2f} "
                     f"{d_p50:>9.2f}ms {g_p50:>10.2f}ms {added:>6.2f}ms {cpu:>6.0f} us")
    if any(target == "limited" for _, _, target in results):
        lines += ["rate-limited key (limits never reached) against the unlimited key, each round's pair:",
                  f"{'load':<14} {'limited rps':>11} {'ratio':>6} {'limited p50':>12} {'added':>8}"]
        for mode, c in LOADS:
            gateway, limited = results[(mode, c, "gateway")], results[(mode, c, "limited")]
            ratio = statistics.median(lim[0] / g[0] for g, lim in zip(gateway, limited, strict=True))
            added = statistics.median(lim[1] - g[1] for g, lim in zip(gateway, limited, strict=True))
            lines.append(f"{mode + ' c=' + str(c):<14} {statistics.median(r[0] for r in limited):>11.1f} "
                         f"{ratio:>6.2f} {statistics.median(r[1] for r in limited):>10.2f}ms {added:>6.2f}ms")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=3.0, help="per load, target and round")
    parser.add_argument("--web-workers", default="1", help="comma-separated: one system per count")
    parser.add_argument("--rate-limited", action="store_true",
                        help="also through a key with limits it never reaches: the rate limits' cost")
    args = parser.parse_args()
    for count in (int(n) for n in args.web_workers.split(",")):
        print(table(measure(count, args.rounds, args.seconds, args.rate_limited), count, args.rounds), flush=True)


if __name__ == "__main__":
    main()
