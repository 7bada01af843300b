"""Scheduler throughput: placements per second and one evaluation's latency, at 10 to 10,000 workers × 8 GPUs.

    .venv/bin/python bench/scheduler.py [--placements 1000] [--sizes 10,100,1000,10000]

Uses a throw-away SQLite database (or DATABASE_URL) and an 8B-shaped sparse GGUF (Q4_K_M, ctx 8192). An evaluation
reads the cluster itself, as POST /api/v1/evaluations does. Each worker's status is shaped as a worker reports it
(CPU, RAM and per-GPU use, its backends). The "live" columns give every worker a new status before each pass and
each evaluation (untimed), as heartbeats do every few seconds: new CPU, RAM and GPU use, and new figures for what
processes outside the product hold on its GPUs. A few minutes on two cores.
Goals: ≥ 2,000 placements/s and one evaluation ≤ 50 ms at 1,000 workers; cost growing no faster than linearly with
the cluster.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("AIMIND_DATA_DIR", tempfile.mkdtemp(prefix="aimind-bench-sched-"))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "aimind.settings")
os.environ.setdefault("AIMIND_WORKER_STALE_AFTER", "3600")  # a long run must not see its workers go stale

import django  # noqa: E402

django.setup()

from django.core.management import call_command  # noqa: E402
from django.utils import timezone  # noqa: E402

from models_app import actions  # noqa: E402
from models_app.models import Model, ModelInstance  # noqa: E402
from scheduler_app.api import evaluate_spec  # noqa: E402
from scheduler_app.scheduler import schedule_instance, schedule_instances  # noqa: E402
from tests.fixtures.sparse_gguf import LLAMA3_8B, write_sparse_llama  # noqa: E402
from workers_app.models import Worker  # noqa: E402

GIB = 1024**3


BACKENDS = {  # what a worker reports of its backends (workers_app.inventory.backend_capabilities)
    "llama-box": {"variant": "cuda-12.4", "installable": True, "reason": "", "default_version": "0.3.36",
                  "installed": ["0.3.36"]},
    "vllm": {"variant": "cuda", "installable": True, "reason": "", "default_version": "0.32.0", "installed": []},
    "vox-box": {"variant": "", "installable": True, "reason": "", "default_version": "0.0.21", "installed": []},
}


def status(i: int, beat: int) -> dict:
    """Worker i's status at heartbeat `beat`: the same inventory every time, its use figures new at each beat."""
    def use(g: int) -> int:
        return (i * 31 + g * 7 + beat * 13) % 97
    return {
        "cpu": {"total": 64, "utilization": use(-1)}, "memory": {"total": 512 * GIB, "used": (40 + use(-2)) * GIB},
        "gpus": [{"index": g, "name": "NVIDIA H100 80GB HBM3", "vendor": "nvidia", "uuid": f"GPU-{i:04d}-{g}",
                  "memory": {"total": 80 * GIB, "used": use(g) * 2**28, "used_by_others": use(g) * 2**20},
                  "core": {"utilization": use(g)}, "compute_capability": "9.0"} for g in range(8)],
        "backends": BACKENDS,
    }


def cluster(n_workers: int) -> None:
    Worker.objects.all().delete()
    now = timezone.now()
    Worker.objects.bulk_create([
        Worker(name=f"w{i:04d}", ip="10.0.0.1", last_heartbeat_at=now, labels={"rack": str(i % 10)},
               status=status(i, 0))
        for i in range(n_workers)
    ])


def heartbeat(beat: int) -> None:
    """Every worker reports again (untimed): a new status, as each heartbeat brings."""
    workers = list(Worker.objects.order_by("id").only("id", "name"))
    for worker in workers:
        worker.status = status(int(worker.name[1:]), beat)
        worker.last_heartbeat_at = timezone.now()
    Worker.objects.bulk_update(workers, ["status", "last_heartbeat_at"], batch_size=1000)


def deploy(path: Path, replicas: int, strategy: str) -> list[int]:
    Model.objects.all().delete()
    model = actions.do_create_model(name="bench", source="local_path", local_path=str(path), replicas=replicas,
                                    placement_strategy=strategy)
    return list(ModelInstance.objects.filter(model=model).order_by("id").values_list("pk", flat=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--placements", type=int, default=1000)
    parser.add_argument("--sizes", default="10,100,1000,10000")
    args = parser.parse_args()
    call_command("migrate", verbosity=0)
    model_path = write_sparse_llama(Path(os.environ["AIMIND_DATA_DIR"]) / "llama3-8b-q4_k_m.gguf", **LLAMA3_8B)
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        cluster(n)
        row = {"workers": n, "gpus": n * 8}
        beats = itertools.count(1)
        for strategy, live in (("spread", False), ("binpack", False), ("spread", True)):
            ids = deploy(model_path, args.placements, strategy)
            if live:
                heartbeat(next(beats))
            began = time.perf_counter()
            outcome = schedule_instances(ids)
            elapsed = time.perf_counter() - began
            placed = sum(1 for state in outcome.values() if state == "scheduled")
            row[f"{strategy}_per_s" + ("_live" if live else "")] = placed / elapsed
        ids = deploy(model_path, 20, "spread")
        one_by_one = []
        for instance_id in ids:
            began = time.perf_counter()
            schedule_instance(instance_id)
            one_by_one.append(time.perf_counter() - began)
        row["single_ms"] = statistics.median(one_by_one) * 1000
        spec = {"name": "eval", "source": "local_path", "local_path": str(model_path)}
        for live in (False, True):
            timings = []
            for _ in range(5):
                if live:
                    heartbeat(next(beats))
                began = time.perf_counter()
                result = evaluate_spec(spec)  # reads the cluster itself, as POST /api/v1/evaluations does
                timings.append(time.perf_counter() - began)
                assert result["compatible"], result["message"][:500]
            row["evaluation_ms" + ("_live" if live else "")] = statistics.median(timings) * 1000
        rows.append(row)
    print(f"\n{args.placements} pending instances of an 8B Q4_K_M (ctx 8192) placed in one scheduler pass; "
          "80 GiB GPUs, 8 per worker; live: every worker's status new before each pass and evaluation\n")
    header = (f"{'workers':>8} {'GPUs':>6} {'spread/s':>10} {'binpack/s':>10} {'live spread/s':>14} "
              f"{'one task ms':>12} {'evaluation ms':>14} {'live eval ms':>13}")
    print(header)
    for r in rows:
        print(f"{r['workers']:>8} {r['gpus']:>6} {r['spread_per_s']:>10.0f} {r['binpack_per_s']:>10.0f} "
              f"{r['spread_per_s_live']:>14.0f} {r['single_ms']:>12.1f} {r['evaluation_ms']:>14.1f} "
              f"{r['evaluation_ms_live']:>13.1f}")
    if len(rows) > 1:
        first, last = rows[0], rows[-1]
        growth = (last["single_ms"] / first["single_ms"]) / (last["workers"] / first["workers"])
        print(f"\ncost per placement grew {last['single_ms'] / first['single_ms']:.1f}x for "
              f"{last['workers'] // first['workers']}x the workers (≤ 1.0 of linear: {growth:.2f})")


if __name__ == "__main__":
    main()
