"""Which running instance serves a request: round-robin over a model's running replicas."""

from __future__ import annotations

import itertools
from collections import defaultdict
from dataclasses import dataclass

from models_app.choices import InstanceState
from models_app.models import Model, ModelInstance

_counters: dict[int, itertools.count] = defaultdict(itertools.count)


@dataclass(frozen=True)
class Upstream:
    instance_id: int
    base_url: str
    backend: str = ""
    api_key: str = ""  # the instance's own: its backend answers nobody else


class UnknownModel(Exception):
    pass


class NoRunningInstance(Exception):
    pass


async def pick_upstream(model_name: str) -> Upstream:
    model = await Model.objects.filter(name=model_name).only("id", "backend").afirst()
    if model is None:
        raise UnknownModel(model_name)
    running = [
        row
        async for row in ModelInstance.objects.filter(
            model_id=model.pk, state=InstanceState.RUNNING, port__isnull=False, worker__isnull=False
        ).order_by("id").values_list("pk", "worker__ip", "port", "backend", "backend_api_key")
    ]
    if not running:
        raise NoRunningInstance(model_name)
    pk, ip, port, backend, key = running[next(_counters[model.pk]) % len(running)]
    host = "127.0.0.1" if ip in ("", "0.0.0.0") else ip
    return Upstream(pk, f"http://{host}:{port}", backend or model.backend, key)
