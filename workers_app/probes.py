"""The server's own look at a silent worker's backends: a worker whose heartbeats stopped is declared lost only for
the instances whose backends also stop answering their health check from here (a heartbeat blip, a server that
could not record heartbeats, a worker agent that hangs: none of them moves an instance that still serves)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
from django.conf import settings
from django.db.models import Q

from models_app.choices import InstanceState
from models_app.models import ModelInstance
from workers_app.backends import get_backend

MAX_PARALLEL_PROBES = 16


def _address(ip: str, port: int, backend: str) -> str:
    host = "127.0.0.1" if ip in ("", "0.0.0.0") else ip
    return f"http://{host}:{port}{get_backend(backend or 'llama-box').health_path}"


def answering_instances(*, on_workers: list[int] = (), instance_ids: list[int] = ()) -> set[int]:
    """Of the running (or unreachable) instances on these workers, or with these ids, those whose backends answer
    their health check (200) within AIMIND_BACKEND_PROBE_TIMEOUT."""
    if not on_workers and not instance_ids:
        return set()
    targets = [(pk, _address(ip, port, backend or model_backend))
               for pk, ip, port, backend, model_backend in ModelInstance.objects.filter(
                   Q(worker_id__in=list(on_workers)) | Q(pk__in=list(instance_ids)),
                   state__in=[InstanceState.RUNNING, InstanceState.UNREACHABLE], port__isnull=False,
                   worker__isnull=False)
               .values_list("pk", "worker__ip", "port", "backend", "model__backend")]
    if not targets:
        return set()
    timeout = settings.BACKEND_PROBE_TIMEOUT
    with httpx.Client(timeout=httpx.Timeout(timeout, connect=timeout)) as client:
        def answers(url: str) -> bool:
            try:
                return client.get(url).status_code == 200
            except httpx.HTTPError:
                return False

        with ThreadPoolExecutor(min(MAX_PARALLEL_PROBES, len(targets))) as pool:
            results = list(pool.map(answers, [url for _, url in targets]))
    return {pk for (pk, _), ok in zip(targets, results, strict=True) if ok}
