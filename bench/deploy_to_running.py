"""Time from POST /api/v1/models to `running` for the tiny model, next to a bare llama-server start.

    .venv/bin/python bench/deploy_to_running.py [--rounds 5]

Both are measured in the same run on the same machine; the difference is aiMindServe's overhead
(API, Celery hops, scheduling, launch, health polling). Goal: under 1 s.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.e2e.system import free_port, start_system  # noqa: E402
from tests.fixtures.tiny_gguf import write_tiny_llama  # noqa: E402
from workers_app.backends.llama_box_install import ensure  # noqa: E402

CTX = ["--ctx-size", "512"]


def bare_start(server: Path, model: Path) -> float:
    port = free_port()
    began = time.perf_counter()
    proc = subprocess.Popen([str(server), "-m", str(model), "--host", "127.0.0.1", "--port", str(port), "-ngl", "0",
                             *CTX], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    return time.perf_counter() - began
            except httpx.HTTPError:
                pass
            time.sleep(0.005)
    finally:
        proc.terminate()
        proc.wait()


def deploy_to_running(client: httpx.Client, model: Path, name: str) -> float:
    began = time.perf_counter()
    created = client.post("/api/v1/models", json={"name": name, "source": "local_path", "local_path": str(model),
                                                  "backend_parameters": CTX})
    created.raise_for_status()
    model_id = created.json()["id"]
    while True:
        instances = client.get(f"/api/v1/models/{model_id}/instances").json()
        if instances and instances[0]["state"] == "running":
            elapsed = time.perf_counter() - began
            break
        if instances and instances[0]["state"] == "error":
            raise RuntimeError(instances[0]["state_message"])
        time.sleep(0.01)
    client.delete(f"/api/v1/models/{model_id}").raise_for_status()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="aimind-bench-") as tmp:
        tmp_path = Path(tmp)
        model = write_tiny_llama(tmp_path / "tiny.gguf")
        server = ensure().server
        bare = [bare_start(server, model) for _ in range(args.rounds)]
        system = start_system(tmp_path)
        try:
            with system.client() as client:
                deploy_to_running(client, model, "warm-up")
                ours = [deploy_to_running(client, model, f"bench-{n}") for n in range(args.rounds)]
        finally:
            system.stop()
    overhead = [o - statistics.median(bare) for o in ours]
    print(f"\n{'measure (seconds, ' + str(args.rounds) + ' rounds)':<40} {'median':>8} {'min':>8} {'max':>8}")
    for label, values in (("bare llama-server start → /health 200", bare),
                          ("POST /api/v1/models → running", ours),
                          ("aiMindServe overhead", overhead)):
        print(f"{label:<40} {statistics.median(values):>8.3f} {min(values):>8.3f} {max(values):>8.3f}")
    print(f"\ngoal: overhead under 1 s — {'met' if statistics.median(overhead) < 1 else 'NOT met'}")


if __name__ == "__main__":
    main()
