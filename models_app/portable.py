"""A cluster's deployments as a file: every model's settings (what an operator chose, nothing the product computed),
written as YAML and read back by name, so deployments can be kept in git and restored after an upgrade."""

from __future__ import annotations

import yaml
from django.db import transaction

from models_app import actions
from models_app.models import Model
from models_app.serializers import ModelSerializer
from models_app.validation import flatten_errors

# The settings an operator chooses; ids, states and what the product derives stay out of the file.
FIELDS = ("name", "description", "source", "huggingface_repo_id", "huggingface_filename", "model_scope_model_id",
          "model_scope_file_path", "local_path", "replicas", "categories", "placement_strategy", "worker_selector",
          "gpu_selector", "backend", "backend_version", "backend_parameters", "env", "cpu_offloading",
          "distributed_inference_across_workers", "restart_on_error", "sleep_after_minutes",
          "requests_per_minute")
FORMAT = 1


class ImportRefused(ValueError):
    """The file cannot be applied; nothing was changed."""


def export_models() -> str:
    models = [{field: getattr(model, field) for field in FIELDS} for model in Model.objects.order_by("name")]
    return yaml.safe_dump({"aimind_models": FORMAT, "models": models}, sort_keys=False, allow_unicode=True)


def import_models(text: str) -> dict[str, list[str]]:
    """Create or update each model of the file by name (in one transaction: a refused entry changes nothing).
    Returns the names created, updated and unchanged."""
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ImportRefused(f"not YAML: {exc}") from None
    if not isinstance(document, dict) or not isinstance(document.get("models"), list):
        raise ImportRefused("expected a mapping with a `models` list (as export_models writes)")
    if document.get("aimind_models", FORMAT) != FORMAT:
        raise ImportRefused(f"format {document.get('aimind_models')!r} is not {FORMAT}")
    done: dict[str, list[str]] = {"created": [], "updated": [], "unchanged": []}
    seen: set[str] = set()
    with transaction.atomic():
        for number, entry in enumerate(document["models"], 1):
            if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
                raise ImportRefused(f"model {number}: needs a `name`")
            name = entry["name"]
            if name in seen:
                raise ImportRefused(f"model {name}: named twice in the file")
            seen.add(name)
            unknown = sorted(set(entry) - set(FIELDS))
            if unknown:
                raise ImportRefused(f"model {name}: unknown field(s) {', '.join(unknown)}")
            existing = Model.objects.filter(name=name).first()
            serializer = ModelSerializer(existing, data=entry)
            if not serializer.is_valid():
                problems = "; ".join(f"{field}: {message}" for field, messages in serializer.errors.items()
                                     for message in flatten_errors(messages))
                raise ImportRefused(f"model {name}: {problems}")
            values = serializer.validated_data
            if existing is None:
                actions.do_create_model(**values)
                done["created"].append(name)
            elif any(getattr(existing, field) != value for field, value in values.items()):
                actions.do_update_model(existing, values)
                done["updated"].append(name)
            else:
                done["unchanged"].append(name)
    return done
