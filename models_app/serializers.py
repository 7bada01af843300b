from __future__ import annotations

import os
from pathlib import Path

from django.conf import settings
from django.db.models import Sum
from rest_framework import serializers

from models_app.choices import CategoryChoices, SourceChoices
from models_app.models import InstanceEvent, Model, ModelInstance
from models_app.sources.local import looks_gguf
from workers_app import backends
from workers_app.backends.base import version_problem
from workers_app.backends.versions import missing_version

GGUF_MAGIC = b"GGUF"
MAX_REQUESTS_PER_MINUTE = 1_000_000_000
MAX_SLEEP_AFTER_MINUTES = 60 * 24 * 365  # a year

_REQUIRED_BY_SOURCE = {
    SourceChoices.HUGGINGFACE: ["huggingface_repo_id"],
    SourceChoices.MODELSCOPE: ["model_scope_model_id"],
    SourceChoices.LOCAL_PATH: ["local_path"],
}


def _check_visible_local_path(path: Path) -> str | None:
    """Problems the server can see; a path it cannot see is left for the worker to report."""
    if not path.is_absolute():
        return "must be an absolute path"
    if ".." in path.parts:
        return "must not contain .. (name the real path)"
    if not path.exists():
        return None
    if not os.access(path, os.R_OK):
        return f"{path} is not readable"
    if not path.is_file() and not path.is_dir():
        return f"{path} is neither a file nor a directory"
    if path.is_file() and path.suffix == ".gguf":
        try:
            with open(path, "rb") as f:
                if f.read(4) != GGUF_MAGIC:
                    return f"{path} is not a GGUF file"
        except OSError as exc:
            return f"{path} cannot be read: {exc.strerror}"
    return None


def no_control_characters(value: str) -> str:
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise serializers.ValidationError("must not contain control characters")
    return value


class ModelSerializer(serializers.ModelSerializer):
    name = serializers.CharField(max_length=255, validators=[no_control_characters])
    description = serializers.CharField(max_length=10000, allow_blank=True, required=False)
    replicas = serializers.IntegerField(min_value=0, max_value=settings.MAX_REPLICAS, default=1)
    ready_replicas = serializers.IntegerField(read_only=True)
    categories = serializers.ListField(child=serializers.ChoiceField(CategoryChoices.choices), required=False,
                                       max_length=len(CategoryChoices.choices))
    backend_parameters = serializers.ListField(child=serializers.CharField(allow_blank=False, max_length=4096),
                                               required=False, max_length=256)
    worker_selector = serializers.DictField(child=serializers.CharField(max_length=255), required=False)
    env = serializers.DictField(child=serializers.CharField(allow_blank=True, max_length=32768), required=False)
    sleep_after_minutes = serializers.IntegerField(
        min_value=1, max_value=MAX_SLEEP_AFTER_MINUTES, allow_null=True, required=False,
        help_text="Put the model to sleep (its replicas stop) after this many minutes without requests; a request "
                  "wakes it. Null: never sleeps.")

    requests_per_minute = serializers.IntegerField(
        min_value=1, max_value=MAX_REQUESTS_PER_MINUTE, allow_null=True, required=False,
        help_text="Requests per minute the gateway passes to this model, over all API keys (more: 429). Null: no "
                  "limit.")

    class Meta:
        model = Model
        fields = [
            "id", "name", "description", "source", "huggingface_repo_id", "huggingface_filename",
            "model_scope_model_id", "model_scope_file_path", "local_path", "replicas", "ready_replicas",
            "categories", "placement_strategy", "worker_selector", "gpu_selector", "backend", "backend_version",
            "backend_parameters", "env", "cpu_offloading", "distributed_inference_across_workers",
            "restart_on_error", "requests_per_minute", "sleep_after_minutes", "asleep", "last_request_at",
            "config_version", "created_at", "updated_at",
        ]
        read_only_fields = ["asleep", "last_request_at", "config_version", "created_at", "updated_at"]

    def validate_name(self, value):
        if Model.objects.filter(name=value).exclude(pk=getattr(self.instance, "pk", None)).exists():
            raise serializers.ValidationError("model with this name already exists.")
        return value

    def validate_worker_selector(self, value):
        if any(not str(key).strip() for key in value):
            raise serializers.ValidationError("every label in the selector needs a key")
        if len(value) > 64 or any(len(str(key)) > 255 for key in value):
            raise serializers.ValidationError("at most 64 labels, keys of at most 255 characters")
        return value

    def validate_env(self, value):
        if len(value) > 256:
            raise serializers.ValidationError(f"at most 256 variables, got {len(value)}")
        return value

    def validate_replicas(self, value):
        """The cluster's cap on instances (AIMIND_MAX_INSTANCES) counts every model's replicas."""
        others = Model.objects.exclude(pk=getattr(self.instance, "pk", None)).aggregate(n=Sum("replicas"))["n"] or 0
        if others + value > settings.MAX_INSTANCES:
            raise serializers.ValidationError(
                f"the cluster allows {settings.MAX_INSTANCES} instances in all (AIMIND_MAX_INSTANCES); other models "
                f"have {others}, so at most {max(0, settings.MAX_INSTANCES - others)} here")
        return value

    def validate_gpu_selector(self, value):
        if value in (None, {}):
            return None
        ids = value.get("gpu_ids") if isinstance(value, dict) else None
        if not isinstance(ids, list) or not ids:
            raise serializers.ValidationError('expected {"gpu_ids": ["<worker name>:<gpu index>", ...]}')
        if len(ids) > 1024 or any(len(str(i)) > 300 for i in ids):
            raise serializers.ValidationError("at most 1024 GPUs, ids of at most 300 characters")
        for gpu_id in ids:
            worker, sep, index = str(gpu_id).rpartition(":")
            if not sep or not worker or not (index.isascii() and index.isdigit()) or len(index) > 4:
                raise serializers.ValidationError(f"{gpu_id!r} is not of the form <worker name>:<gpu index>")
        return {"gpu_ids": [str(i) for i in ids]}

    def validate(self, attrs):
        merged = {f: getattr(self.instance, f) for f in self.Meta.fields if self.instance is not None
                  and hasattr(self.instance, f)}
        merged.update(attrs)
        source = merged.get("source")
        errors = {}
        for field in _REQUIRED_BY_SOURCE.get(source, []):
            if not (merged.get(field) or "").strip():
                errors[field] = [f"required when source is {source}"]
        if source == SourceChoices.LOCAL_PATH and merged.get("local_path") and "local_path" not in errors:
            problem = _check_visible_local_path(Path(merged["local_path"]))
            if problem:
                errors["local_path"] = [problem]
        errors.update(_backend_problems(merged, attrs))
        if errors:
            raise serializers.ValidationError(errors)
        return attrs


def _backend_problems(merged: dict, attrs: dict) -> dict[str, list[str]]:
    """The backend's own rules (its reserved flags, parameter syntax, reserved env), from the registry; and a
    version the package index does not list. With the backend left empty, every backend it could become."""
    checked = backends.backends_checked_for(merged.get("backend") or "", looks_gguf(merged))
    errors: dict[str, list[str]] = {}
    params, env = merged.get("backend_parameters") or [], merged.get("env") or {}
    for field, problems in (("backend_parameters", [p for b in checked for p in b.check_parameters(params)]),
                            ("env", [p for b in checked for p in b.check_env(env, settings.ALLOW_LOADER_ENV)])):
        if problems:
            errors[field] = list(dict.fromkeys(problems))
    version = merged.get("backend_version") or ""
    problem = version_problem(version)
    if not problem and merged.get("backend") and version and {"backend", "backend_version"} & set(attrs):
        problem = missing_version(checked[0], version)  # with the backend left empty, the worker finds out
    if problem:
        errors["backend_version"] = [problem]
    return errors


class ModelInstanceSerializer(serializers.ModelSerializer):
    worker_name = serializers.CharField(source="worker.name", read_only=True, default=None)
    model_name = serializers.CharField(source="model.name", read_only=True)
    outdated = serializers.BooleanField(read_only=True, help_text="Runs an older configuration of its model; "
                                                                  "deleting it recreates it with the current one.")

    class Meta:
        model = ModelInstance
        fields = [
            "id", "name", "model", "model_name", "worker", "worker_name", "gpu_indexes", "port", "pid", "state",
            "state_message", "error_kind", "backend", "backend_version", "download_progress", "restart_count",
            "last_restart_at", "next_restart_at",
            "computed_resource_claim", "measured", "distributed_servers", "placement_explanation", "config_version",
            "outdated", "running_since", "created_at", "updated_at",
        ]
        read_only_fields = fields


class InstanceEventSerializer(serializers.ModelSerializer):
    restart_at = serializers.DateTimeField(read_only=True, allow_null=True, help_text=(
        "A failure: when it booked the instance's restart (its time, when at once); null when it booked none."))
    details = serializers.DictField(read_only=True, help_text=(
        "A deletion (to_state `deleted`): instance_name, model_id, model_name, worker_name; else empty."))

    class Meta:
        model = InstanceEvent
        fields = ["time", "from_state", "to_state", "cause", "message", "restart_at", "details"]
        read_only_fields = fields


class DeletedInstanceSerializer(serializers.Serializer):
    """A deleted instance, from its last event (its row is gone; its history stays for AIMIND_EVENT_RETENTION_DAYS)."""

    id = serializers.IntegerField(source="instance_id")
    name = serializers.CharField(source="details.instance_name", default="")
    model = serializers.IntegerField(source="details.model_id", default=None, allow_null=True)
    model_name = serializers.CharField(source="details.model_name", default="")
    worker_name = serializers.CharField(source="details.worker_name", default="")
    state = serializers.CharField(source="from_state", help_text="The state it was in when it was deleted.")
    deleted_at = serializers.DateTimeField(source="time")
    message = serializers.CharField(help_text="Why, and by whom.")
