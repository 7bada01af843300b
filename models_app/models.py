from __future__ import annotations

from django.db import models
from django.db.models import Q
from django.utils.translation import gettext_lazy as _

from models_app.choices import (
    EVENT_STATE_CHOICES,
    BackendChoices,
    ErrorKind,
    InstanceState,
    PlacementStrategyChoices,
    SourceChoices,
)


class Model(models.Model):
    """A deployable model: where its files come from, how many replicas, how and where to run them."""

    name = models.CharField(_("Name"), max_length=255, unique=True,
                            help_text=_("Also the name clients use in OpenAI requests."))
    description = models.TextField(blank=True, default="")
    source = models.CharField(max_length=32, choices=SourceChoices.choices)
    huggingface_repo_id = models.CharField(max_length=255, blank=True, default="")
    huggingface_filename = models.CharField(max_length=255, blank=True, default="")
    model_scope_model_id = models.CharField(max_length=255, blank=True, default="")
    model_scope_file_path = models.CharField(max_length=255, blank=True, default="")
    local_path = models.CharField(_("Model path"), max_length=1024, blank=True, default="")
    replicas = models.PositiveIntegerField(_("Replicas"), default=1)
    categories = models.JSONField(_("Category"), default=list, blank=True)
    placement_strategy = models.CharField(
        _("Placement strategy"), max_length=16, choices=PlacementStrategyChoices.choices,
        default=PlacementStrategyChoices.SPREAD,
    )
    worker_selector = models.JSONField(_("Worker selector"), default=dict, blank=True)
    gpu_selector = models.JSONField(_("GPU selector"), null=True, blank=True)
    backend = models.CharField(_("Backend"), max_length=32, choices=BackendChoices.choices, blank=True, default="")
    backend_version = models.CharField(_("Backend version"), max_length=64, blank=True, default="")
    backend_parameters = models.JSONField(_("Backend parameters"), default=list, blank=True)
    env = models.JSONField(_("Environment variables"), default=dict, blank=True)
    cpu_offloading = models.BooleanField(_("Allow CPU offloading"), default=True)
    distributed_inference_across_workers = models.BooleanField(_("Allow distributed inference across workers"),
                                                               default=True)
    restart_on_error = models.BooleanField(_("Auto-restart on error"), default=True)
    requests_per_minute = models.PositiveIntegerField(
        _("Requests per minute"), null=True, blank=True,
        help_text=_("Across all API keys, counted by the gateway; blank: no limit."))
    sleep_after_minutes = models.PositiveIntegerField(
        _("Sleep after minutes idle"), null=True, blank=True,
        help_text=_("Stop its replicas after this many minutes without requests; a request wakes it. "
                    "Blank: never sleeps."))
    asleep = models.BooleanField(default=False, editable=False,
                                 help_text="Its replicas were stopped for idleness; the next request wakes it.")
    last_request_at = models.DateTimeField(null=True, blank=True, editable=False,
                                           help_text="When the gateway last passed a request for it.")
    config_version = models.PositiveIntegerField(default=1, editable=False,
                                                 help_text="Bumped when a change needs new instances to take effect.")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    # Changing these does not change what a running instance is: no new config version.
    LIVE_FIELDS = frozenset({"replicas", "description", "restart_on_error", "requests_per_minute",
                             "sleep_after_minutes"})

    class Meta:
        ordering = ["name"]
        verbose_name = _("Model")
        verbose_name_plural = _("Models")

    def __str__(self) -> str:
        return self.name

    @property
    def source_display(self) -> str:
        if self.source == SourceChoices.HUGGINGFACE:
            return f"{self.huggingface_repo_id}/{self.huggingface_filename}".rstrip("/")
        if self.source == SourceChoices.MODELSCOPE:
            return f"{self.model_scope_model_id}/{self.model_scope_file_path}".rstrip("/")
        return self.local_path

    @property
    def ready_replicas(self) -> int:
        annotated = getattr(self, "ready_replicas_count", None)
        if annotated is not None:
            return annotated
        return self.instances.filter(state=InstanceState.RUNNING).count()


class ModelInstance(models.Model):
    """One replica of a model, placed on a worker and backed by one backend process there."""

    name = models.CharField(max_length=255)
    model = models.ForeignKey(Model, on_delete=models.CASCADE, related_name="instances")
    worker = models.ForeignKey(
        "workers_app.Worker", on_delete=models.SET_NULL, null=True, blank=True, related_name="instances"
    )
    gpu_indexes = models.JSONField(default=list, blank=True)
    port = models.PositiveIntegerField(null=True, blank=True)
    pid = models.PositiveIntegerField(null=True, blank=True)
    state = models.CharField(max_length=16, choices=InstanceState.choices, default=InstanceState.PENDING)
    state_message = models.TextField(blank=True, default="")
    error_kind = models.CharField(max_length=16, choices=ErrorKind.choices, blank=True, default="",
                                  help_text="In error: permanent (no automatic restart) or transient (restarted).")
    backend = models.CharField(max_length=32, blank=True, default="", help_text="The backend it runs on.")
    backend_version = models.CharField(max_length=64, blank=True, default="",
                                       help_text="The backend version it runs (the default when the model names none).")
    download_progress = models.FloatField(default=0)
    restart_count = models.PositiveIntegerField(default=0)
    last_restart_at = models.DateTimeField(null=True, blank=True)
    next_restart_at = models.DateTimeField(null=True, blank=True)
    computed_resource_claim = models.JSONField(default=dict, blank=True)
    distributed_servers = models.JSONField(default=list, blank=True)
    measured = models.JSONField(
        default=dict, blank=True, help_text="What the backend really uses, sampled by its worker: ram, vram per GPU "
                                            "index, at, and over_claim when it uses more than it claimed.")
    placement_explanation = models.JSONField(
        default=dict, blank=True, help_text="Why the scheduler placed it there, or why nowhere: the chosen worker and "
                                            "GPUs with their score, and why other workers lost.")
    resolved_path = models.CharField(max_length=1024, blank=True, default="")
    backend_api_key = models.CharField(max_length=64, blank=True, default="", editable=False,
                                       help_text="The secret its backend requires; only the gateway sends it.")
    config_version = models.PositiveIntegerField(default=1, help_text="The model's config version it was created with.")
    running_since = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["id"]
        verbose_name = _("Model instance")
        verbose_name_plural = _("Model instances")
        indexes = [
            # The scheduler's hot query: what is still waiting for a place.
            models.Index(fields=["state"], name="instance_pending_idx", condition=Q(state=InstanceState.PENDING)),
        ]

    def __str__(self) -> str:
        return self.name

    @property
    def state_colour(self) -> str:
        return InstanceState.colour(self.state)

    @property
    def outdated(self) -> bool:
        """Runs an older configuration of its model; deleting it brings a replacement with the current one."""
        return self.config_version < self.model.config_version

    @property
    def claimed_bytes(self) -> int | None:
        """RAM and VRAM it claims, together (None: the claim is unknown or not made yet)."""
        return claimed_total(self.computed_resource_claim)

    @property
    def measured_bytes(self) -> int | None:
        """RAM and VRAM its worker last measured it using, together (None: not measured)."""
        return measured_total(self.measured)

    @property
    def offloads_to_cpu(self) -> bool:
        claim = self.computed_resource_claim or {}
        return int(claim.get("offload_layers") or 0) < int(claim.get("total_layers") or 0)


def claimed_total(claim: dict | None) -> int | None:
    """A claim's RAM and VRAM together; None when unknown or not made."""
    if not claim or claim.get("unknown"):
        return None
    return int(claim.get("ram") or 0) + sum(int(v or 0) for v in (claim.get("vram") or {}).values())


def measured_total(measured: dict | None) -> int | None:
    """A measurement's RAM and VRAM together; None when not measured."""
    if not measured or not measured.get("at"):
        return None
    return int(measured.get("ram") or 0) + sum(int(v or 0) for v in (measured.get("vram") or {}).values())


MAX_ID = 2**63 - 1  # the largest id a row can have: a larger one in a URL finds nothing (the database would refuse it)


class InstanceEvent(models.Model):
    """One transition in an instance's history: when, from which state to which, why, and what it said. The history
    outlives the instance: deleting it records a last event (`deleted`) and leaves the others (no database
    constraint ties them to the row); AIMIND_EVENT_RETENTION_DAYS prunes them like any other."""

    instance = models.ForeignKey(ModelInstance, on_delete=models.DO_NOTHING, db_constraint=False,
                                 related_name="events")
    time = models.DateTimeField(auto_now_add=True, db_index=True)
    from_state = models.CharField(max_length=16, choices=InstanceState.choices)
    to_state = models.CharField(max_length=16, choices=EVENT_STATE_CHOICES)
    cause = models.CharField(max_length=32, help_text="What happened, in one word (placed, failed, restart, …).")
    message = models.TextField(blank=True, default="")
    restart_at = models.DateTimeField(null=True, blank=True,
                                      help_text="A failure: when it booked the instance's restart (null: none).")
    details = models.JSONField(default=dict, blank=True,
                               help_text="A deletion: the instance's name, model (id and name) and worker, kept "
                                         "since the row is gone.")

    class Meta:
        ordering = ["id"]
        indexes = [models.Index(fields=["to_state", "id"], name="event_to_state_id")]  # the deleted ones, newest first
        verbose_name = _("Instance event")
        verbose_name_plural = _("Instance events")

    def __str__(self) -> str:
        return f"{self.instance_id}: {self.from_state} → {self.to_state} ({self.cause})"
