from __future__ import annotations

import os
from pathlib import Path

from rest_framework import serializers

from models_app.choices import CategoryChoices, SourceChoices
from models_app.models import InstanceEvent, Model, ModelInstance
from models_app.sources.local import looks_gguf
from workers_app import backends
from workers_app.backends.base import version_problem
from workers_app.backends.versions import missing_version

GGUF_MAGIC = b"GGUF"

_REQUIRED_BY_SOURCE = {
    SourceChoices.HUGGINGFACE: ["huggingface_repo_id"],
    SourceChoices.MODELSCOPE: ["model_scope_model_id"],
    SourceChoices.LOCAL_PATH: ["local_path"],
}


def _check_visible_local_path(path: Path) -> str | None:
    """Problems the server can see; a path it cannot see is left for the worker to report."""
    if not path.is_absolute():
        return "must be an absolute path"
    if not path.exists():
        return None
    if not os.access(path, os.R_OK):
        return f"{path} is not readable"
    if path.is_file() and path.suffix == ".gguf":
        try:
            with open(path, "rb") as f:
                if f.read(4) != GGUF_MAGIC:
                    return f"{path} is not a GGUF file"
        except OSError as exc:
            return f"{path} cannot be read: {exc.strerror}"
    return None


class ModelSerializer(serializers.ModelSerializer):
    replicas = serializers.IntegerField(min_value=0, default=1)
    ready_replicas = serializers.IntegerField(read_only=True)
    categories = serializers.ListField(child=serializers.ChoiceField(CategoryChoices.choices), required=False)
    backend_parameters = serializers.ListField(child=serializers.CharField(allow_blank=False), required=False)
    worker_selector = serializers.DictField(child=serializers.CharField(), required=False)
    env = serializers.DictField(child=serializers.CharField(allow_blank=True), required=False)

    class Meta:
        model = Model
        fields = [
            "id", "name", "description", "source", "huggingface_repo_id", "huggingface_filename",
            "model_scope_model_id", "model_scope_file_path", "local_path", "replicas", "ready_replicas",
            "categories", "placement_strategy", "worker_selector", "gpu_selector", "backend", "backend_version",
            "backend_parameters", "env", "cpu_offloading", "distributed_inference_across_workers",
            "restart_on_error", "config_version", "created_at", "updated_at",
        ]
        read_only_fields = ["config_version", "created_at", "updated_at"]

    def validate_worker_selector(self, value):
        if any(not str(key).strip() for key in value):
            raise serializers.ValidationError("every label in the selector needs a key")
        return value

    def validate_gpu_selector(self, value):
        if value in (None, {}):
            return None
        ids = value.get("gpu_ids") if isinstance(value, dict) else None
        if not isinstance(ids, list) or not ids:
            raise serializers.ValidationError('expected {"gpu_ids": ["<worker name>:<gpu index>", ...]}')
        for gpu_id in ids:
            worker, sep, index = str(gpu_id).rpartition(":")
            if not sep or not worker or not index.isdigit():
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
                            ("env", [p for b in checked for p in b.check_env(env)])):
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
            "computed_resource_claim", "distributed_servers", "config_version", "outdated", "running_since",
            "created_at", "updated_at",
        ]
        read_only_fields = fields


class InstanceEventSerializer(serializers.ModelSerializer):
    class Meta:
        model = InstanceEvent
        fields = ["time", "from_state", "to_state", "cause", "message"]
        read_only_fields = fields
