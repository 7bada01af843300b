from __future__ import annotations

from datetime import timedelta

from django.conf import settings
from django.db import models
from django.utils import timezone
from django.utils.translation import gettext_lazy as _

from workers_app.choices import WorkerState


class Worker(models.Model):
    """A node that runs backend processes; its inventory is what it last reported."""

    name = models.CharField(max_length=255, unique=True)
    hostname = models.CharField(max_length=255, blank=True, default="")
    ip = models.CharField(max_length=64, blank=True, default="")
    labels = models.JSONField(default=dict, blank=True, verbose_name=_("Labels"))
    reported_labels = models.JSONField(default=dict, blank=True, editable=False,
                                       help_text="The labels the worker itself gave at its last registration.")
    credential_hash = models.CharField(max_length=64, blank=True, default="", editable=False,
                                       help_text="SHA-256 of the worker's own secret, issued when it joined.")
    system_reserved = models.JSONField(default=dict, blank=True)
    status = models.JSONField(default=dict, blank=True)
    state = models.CharField(max_length=16, choices=WorkerState.choices, default=WorkerState.READY)
    state_message = models.TextField(blank=True, default="")
    last_heartbeat_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]
        verbose_name = _("Worker")
        verbose_name_plural = _("Workers")

    def __str__(self) -> str:
        return self.name

    @property
    def queue(self) -> str:
        return f"worker.{self.name}"

    @property
    def gpus(self) -> list[dict]:
        return list(self.status.get("gpus") or [])

    @property
    def ram_total(self) -> int:
        return int((self.status.get("memory") or {}).get("total") or 0)

    @property
    def cpu_cores(self) -> int:
        return int((self.status.get("cpu") or {}).get("total") or 0)

    @property
    def heartbeat_is_fresh(self) -> bool:
        if self.last_heartbeat_at is None:
            return False
        return timezone.now() - self.last_heartbeat_at < timedelta(seconds=settings.WORKER_STALE_AFTER)

    @property
    def state_colour(self) -> str:
        return WorkerState.colour(self.state)


class WorkerSample(models.Model):
    """A worker's load in one minute, from its heartbeats (the first of the minute): CPU, RAM and each GPU's memory
    and core use. For the dashboard; kept AIMIND_SAMPLE_RETENTION_HOURS."""

    worker = models.ForeignKey(Worker, on_delete=models.CASCADE, related_name="samples")
    minute = models.DateTimeField(db_index=True)
    cpu_percent = models.FloatField(default=0)
    ram_used = models.PositiveBigIntegerField(default=0)
    ram_total = models.PositiveBigIntegerField(default=0)
    gpus = models.JSONField(default=list, blank=True, help_text='[{"index", "used", "total", "utilization"}]')

    class Meta:
        ordering = ["minute"]
        constraints = [models.UniqueConstraint(fields=["worker", "minute"], name="one_sample_per_worker_minute")]

    def __str__(self) -> str:
        return f"{self.worker_id} {self.minute:%Y-%m-%d %H:%M}"
