"""Each backend with its tiny test model: install time (first, from the install's own record; cached, measured),
POST /api/v1/models → running, and the RSS of the backend's process tree next to the scheduler's RAM claim.

    .venv/bin/python bench/backends.py [--backends llama-box,vllm,vox-box] [--rounds 2]

Installs the backends it does not find (vox-box: about 9 GB, several minutes). One run, one machine: compare the
rows with each other, not with another day's numbers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.e2e.system import start_system  # noqa: E402
from tests.fixtures.speech import spoken, whisper_base  # noqa: E402
from tests.fixtures.tiny_gguf import write_tiny_llama  # noqa: E402
from tests.fixtures.tiny_hf import write_tiny_llama_hf  # noqa: E402
from workers_app import inventory  # noqa: E402
from workers_app.backends import get_backend, installs  # noqa: E402

MIB = 1024**2
REPO = Path(__file__).resolve().parent.parent


def tree_rss(pid: int) -> int:
    root = psutil.Process(pid)
    total = 0
    for process in [root, *root.children(recursive=True)]:
        try:
            total += process.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return total


def install_times(name: str) -> tuple[float | None, float]:
    """(seconds the first install took, as its record says; seconds `install_backend` takes once installed)."""
    backend = get_backend(name)
    variant = backend.variant(inventory.node_info())
    began = time.perf_counter()
    subprocess.run([sys.executable, str(REPO / "manage.py"), "install_backend", name], check=True,
                   capture_output=True, timeout=3600)
    cached_began = time.perf_counter()
    subprocess.run([sys.executable, str(REPO / "manage.py"), "install_backend", name], check=True,
                   capture_output=True, timeout=600)
    cached = time.perf_counter() - cached_began
    found = backend.find(backend.default_version, variant)
    record = installs.read_marker(found.root if name != "llama-box" else found.root.parent) if found else {}
    first = record.get("seconds")
    if first is None and cached_began - began > 30:
        first = cached_began - began  # installed just now, by the first call
    return first, cached


def deploy(client: httpx.Client, name: str, path: Path, params: list[str]) -> tuple[float, dict]:
    began = time.perf_counter()
    created = client.post("/api/v1/models", json={"name": name, "source": "local_path", "local_path": str(path),
                                                  "backend_parameters": params})
    created.raise_for_status()
    model_id = created.json()["id"]
    while True:
        instances = client.get(f"/api/v1/models/{model_id}/instances").json()
        if instances and instances[0]["state"] == "running":
            return time.perf_counter() - began, instances[0]
        if instances and instances[0]["state"] == "error":
            raise RuntimeError(f"{name}: {instances[0]['state_message']}")
        time.sleep(0.05)


def exercise(client: httpx.Client, name: str, kind: str, tmp: Path) -> None:
    """One request of the model's kind, so the RSS is that of a backend that has served."""
    if kind == "chat":
        client.post("/v1/chat/completions", json={"model": name, "max_tokens": 8,
                                                  "messages": [{"role": "user", "content": "hello"}]},
                    timeout=300).raise_for_status()
    else:
        audio = spoken("The quick brown fox jumps over the lazy dog.", tmp / "fox.wav")
        with open(audio, "rb") as f:
            client.post("/v1/audio/transcriptions", data={"model": name}, files={"file": ("fox.wav", f, "audio/wav")},
                        timeout=300).raise_for_status()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="llama-box,vllm,vox-box")
    parser.add_argument("--rounds", type=int, default=2, help="deployments per model (the first may compile caches)")
    args = parser.parse_args()
    chosen = args.backends.split(",")
    rows = []
    with tempfile.TemporaryDirectory(prefix="aimind-bench-") as tmp:
        tmp_path = Path(tmp)
        models = {"llama-box": (write_tiny_llama(tmp_path / "tiny.gguf"), ["--ctx-size", "512"], "chat"),
                  "vllm": (write_tiny_llama_hf(tmp_path / "tiny-hf", max_position_embeddings=512),
                           ["--enforce-eager"], "chat"),
                  "vox-box": (whisper_base(), [], "transcription")}
        times = {name: install_times(name) for name in chosen}
        system = start_system(tmp_path)
        try:
            with system.client() as client:
                client.timeout = 60
                for name in chosen:
                    path, params, kind = models[name]
                    runs = []
                    for n in range(args.rounds):
                        seconds, instance = deploy(client, f"{name}-{n}", path, params)
                        exercise(client, f"{name}-{n}", kind, tmp_path)
                        time.sleep(2)
                        runs.append((seconds, tree_rss(instance["pid"]), instance["computed_resource_claim"]))
                        client.delete(f"/api/v1/models/{instance['model']}").raise_for_status()
                    rows.append((name, times[name], runs))
        finally:
            system.stop()
    print(f"\n{'backend':<10} {'first install':>14} {'cached':>8} {'deploy→running (s)':>22} "
          f"{'RSS MiB':>9} {'claim RAM MiB':>14} {'RSS/claim':>10}")
    for name, (first, cached), runs in rows:
        deploys = "/".join(f"{s:.1f}" for s, _, _ in runs)
        rss = statistics.median(r for _, r, _ in runs)
        claim = runs[-1][2].get("ram") or 0
        print(f"{name:<10} {(f'{first:.0f} s' if first else 'n/a'):>14} {cached:>7.1f}s {deploys:>22} "
              f"{rss / MIB:>9.0f} {claim / MIB:>14.0f} {(rss / claim if claim else float('nan')):>10.2f}")
    print("\nclaims:", json.dumps({name: runs[-1][2] for name, _, runs in rows}, indent=1))


if __name__ == "__main__":
    main()
