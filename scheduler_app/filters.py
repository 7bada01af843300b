"""Worker filters: each keeps the workers that pass and says why the others did not."""

from __future__ import annotations

from models_app.models import Model
from workers_app.choices import WorkerState
from workers_app.models import Worker


def parse_gpu_ids(model: Model) -> dict[str, list[int]]:
    """`{"gpu_ids": ["w1:0", "w1:1"]}` → `{"w1": [0, 1]}`; empty when scheduling is automatic."""
    wanted: dict[str, list[int]] = {}
    for gpu_id in (model.gpu_selector or {}).get("gpu_ids") or []:
        worker_name, _, index = str(gpu_id).rpartition(":")
        wanted.setdefault(worker_name, []).append(int(index))
    return wanted


def filter_workers(model: Model, workers: list[Worker]) -> tuple[list[Worker], list[str]]:
    kept, reasons = [], []
    manual = parse_gpu_ids(model)
    for worker in workers:
        if worker.state != WorkerState.READY or not worker.heartbeat_is_fresh:
            reasons.append(f"{worker.name}: not ready ({worker.state})")
            continue
        mismatched = [k for k, v in (model.worker_selector or {}).items() if str(worker.labels.get(k)) != str(v)]
        if mismatched:
            wanted = ", ".join(f"{k}={model.worker_selector[k]}" for k in mismatched)
            reasons.append(f"{worker.name}: labels do not match {wanted}")
            continue
        if manual and worker.name not in manual:
            reasons.append(f"{worker.name}: not in gpu_selector")
            continue
        kept.append(worker)
    if manual:
        unknown = sorted(set(manual) - {w.name for w in workers})
        reasons.extend(f"{name}: no such worker (gpu_selector)" for name in unknown)
    return kept, reasons
