"""Worker filters: keep the workers that may take the model, and say why the others may not."""

from __future__ import annotations

from typing import TYPE_CHECKING

from models_app.models import Model
from workers_app.choices import WorkerState
from workers_app.models import Worker

if TYPE_CHECKING:
    from scheduler_app.resources import WorkerResources
    from scheduler_app.selectors.common import Reasons


def parse_gpu_ids(model: Model) -> dict[str, list[int]]:
    """`{"gpu_ids": ["w1:0", "w1:1"]}` → `{"w1": [0, 1]}`; empty when scheduling is automatic."""
    wanted: dict[str, list[int]] = {}
    for gpu_id in (model.gpu_selector or {}).get("gpu_ids") or []:
        worker_name, _, index = str(gpu_id).rpartition(":")
        wanted.setdefault(worker_name, []).append(int(index))
    return wanted


def cannot_run(worker: Worker, backend: str, version: str) -> str:
    """Why this worker cannot run that backend version ("" when it can, or when its agent does not say)."""
    capability = (worker.status.get("backends") or {}).get(backend) if backend else None
    if capability is None:
        return ""
    if capability.get("installable", True) or (version or capability.get("default_version")) in \
            (capability.get("installed") or []):
        return ""
    return f"cannot run {backend}: {capability.get('reason') or 'not installable on this worker'}"


def filter_workers(model: Model, pool: list[WorkerResources], reasons: Reasons,
                   backend: str = "") -> list[WorkerResources]:
    kept = []
    manual = parse_gpu_ids(model)
    selector = {k: str(v) for k, v in (model.worker_selector or {}).items()}
    version = model.backend_version
    for res in pool:
        worker = res.worker
        if worker.state != WorkerState.READY:
            reasons.add(worker.name, f"is {worker.get_state_display().lower()}")
            continue
        if not res.heartbeat_fresh:
            reasons.add(worker.name, "has not sent a heartbeat recently")
            continue
        if selector:
            mismatched = [f"{k}={v}" for k, v in selector.items() if str(worker.labels.get(k)) != v]
            if mismatched:
                reasons.add(worker.name, f"labels do not match {', '.join(mismatched)}")
                continue
        unable = cannot_run(worker, backend, version) if backend else ""
        if unable:
            reasons.add(worker.name, unable)
            continue
        if manual:
            if worker.name not in manual:
                continue  # not named by gpu_selector: not worth a reason per worker
            missing = [i for i in manual[worker.name] if i not in {int(g.get("index", -1)) for g in worker.gpus}]
            if missing:
                reasons.add(worker.name, f"has no GPU {', '.join(map(str, missing))} (gpu_selector)")
                continue
        kept.append(res)
    for name in sorted(set(manual) - {res.worker.name for res in pool}):
        reasons.add(name, "no such worker (gpu_selector)")
    return kept
