"""Shared test data: an admin with an API client, and workers registered as the API does it."""

from __future__ import annotations

import pytest
from django.contrib.auth import get_user_model
from django.utils import timezone
from rest_framework.test import APIClient

from gateway_app.models import ApiKey
from workers_app.models import Worker

GIB = 1024**3


def cpu_status(ram_gib: float = 16, cores: int = 8) -> dict:
    return {"cpu": {"total": cores}, "memory": {"total": int(ram_gib * GIB), "used": 0}, "gpus": []}


def gpu_status(vram_gib: list[float], ram_gib: float = 64) -> dict:
    status = cpu_status(ram_gib)
    status["gpus"] = [{"index": i, "name": "NVIDIA test", "vendor": "nvidia", "uuid": f"GPU-{i}",
                       "memory": {"total": int(v * GIB), "used": 0}, "core": {"utilization": 0}}
                      for i, v in enumerate(vram_gib)]
    return status


def make_worker(name: str, status: dict | None = None, labels: dict | None = None, **fields) -> Worker:
    fields.setdefault("last_heartbeat_at", timezone.now())
    return Worker.objects.create(name=name, ip="127.0.0.1", status=status or cpu_status(), labels=labels or {},
                                 **fields)


@pytest.fixture
def admin_user(db):
    return get_user_model().objects.create_superuser("admin", password="pw")


@pytest.fixture
def api_key(admin_user):
    return ApiKey.issue(admin_user, "tests")[1]


@pytest.fixture
def api(api_key):
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {api_key}")
    return client
