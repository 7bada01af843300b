"""kill -9 of a backend → detected → running again, for the tiny model on the real system.

    .venv/bin/python bench/restart_latency.py [--rounds 5]

Each round deploys a fresh model (so it is its first crash: restarted at once), waits for `running`,
kills the llama-server with SIGKILL, and polls the API every 10 ms. Goal: detected ≤ 2 s, first restart
immediate (running again ≈ detection + a bare start).
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.e2e.system import start_system  # noqa: E402
from tests.fixtures.tiny_gguf import write_tiny_llama  # noqa: E402


def poll(client, model_id: int, predicate, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        instances = client.get(f"/api/v1/models/{model_id}/instances").json()
        if instances and predicate(instances[0]):
            return instances[0]
        time.sleep(0.01)
    raise TimeoutError(f"model {model_id}: condition not met in {timeout} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    detected, running_again = [], []
    with tempfile.TemporaryDirectory(prefix="aimind-bench-restart-") as tmp:
        model_path = write_tiny_llama(Path(tmp) / "tiny.gguf")
        # The product's default health-check interval, not the tests' shortened one.
        system = start_system(Path(tmp), extra_env={"AIMIND_HEALTH_CHECK_INTERVAL": "1"})
        try:
            with system.client() as client:
                for n in range(args.rounds):
                    model = client.post("/api/v1/models", json={
                        "name": f"crash-{n}", "source": "local_path", "local_path": str(model_path),
                        "backend_parameters": ["--ctx-size", "256"]}).json()
                    first = poll(client, model["id"], lambda i: i["state"] == "running")
                    killed = time.perf_counter()
                    os.kill(first["pid"], signal.SIGKILL)
                    poll(client, model["id"], lambda i: i["state"] != "running" or i["restart_count"] > 0)
                    detected.append(time.perf_counter() - killed)
                    poll(client, model["id"], lambda i, old=first["pid"]: i["state"] == "running" and i["pid"] != old)
                    running_again.append(time.perf_counter() - killed)
                    client.delete(f"/api/v1/models/{model['id']}")
        finally:
            system.stop()
    print(f"\n{'kill -9 → (seconds, ' + str(args.rounds) + ' rounds)':<34} {'median':>8} {'min':>8} {'max':>8}")
    for label, values in (("detected (instance not running)", detected), ("running again", running_again)):
        print(f"{label:<34} {statistics.median(values):>8.3f} {min(values):>8.3f} {max(values):>8.3f}")
    print(f"\ngoal: detected ≤ 2 s — {'met' if max(detected) <= 2 else 'NOT met'}; "
          f"first restart immediate: restart began {statistics.median(running_again) - statistics.median(detected):.3f}"
          " s after detection (includes the backend's own start)")


if __name__ == "__main__":
    main()
