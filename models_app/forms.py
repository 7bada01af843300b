"""The Deploy and Edit pages' form: what the browser posts (rows of parameters, env, labels) turned into the API's
model fields, and a model turned back into rows. Validation is the API's own (models_app.validation)."""

from __future__ import annotations

from django.http import QueryDict

from models_app.choices import CategoryChoices, PlacementStrategyChoices, SourceChoices
from models_app.models import Model
from workers_app.backends.params import as_separate_arguments

TEXT_FIELDS = ("name", "description", "huggingface_repo_id", "huggingface_filename", "model_scope_model_id",
               "model_scope_file_path", "local_path", "backend", "backend_version")
FLAGS = ("cpu_offloading", "distributed_inference_across_workers", "restart_on_error")


def _rows(post: QueryDict, key: str, value: str) -> list[tuple[str, str]]:
    keys, values = post.getlist(key), post.getlist(value)
    values += [""] * (len(keys) - len(values))
    return [(k.strip(), v.strip()) for k, v in zip(keys, values, strict=False) if k.strip() or v.strip()]


def model_data_from_post(post: QueryDict) -> dict:
    """The API's model fields from the page's inputs."""
    data: dict = {field: post.get(field, "").strip() for field in TEXT_FIELDS}
    data["source"] = post.get("source", SourceChoices.LOCAL_PATH)
    data["replicas"] = post.get("replicas", "1").strip() or "1"
    data["categories"] = [c for c in post.getlist("categories") if c]
    manual = post.get("scheduling") == "manual"
    if not manual:  # Manual scheduling hides (and the browser does not send) the strategy and the selector
        data["placement_strategy"] = post.get("placement_strategy", PlacementStrategyChoices.SPREAD)
        data["worker_selector"] = dict(_rows(post, "selector_key", "selector_value"))
    data["gpu_selector"] = {"gpu_ids": post.getlist("gpu_ids")} if manual else None
    data["backend_parameters"] = [item for name, value in _rows(post, "param_name", "param_value")
                                  for item in ([name, value] if value else [name])]
    data["env"] = dict(_rows(post, "env_name", "env_value"))
    for flag in FLAGS:
        data[flag] = post.get(flag) == "on"
    data["sleep_after_minutes"] = post.get("sleep_after_minutes", "").strip() or None  # blank: never sleeps
    data["requests_per_minute"] = post.get("requests_per_minute", "").strip() or None  # blank: no limit
    return data


def changed_fields(model: Model, validated: dict) -> dict:
    """The fields an edit really changes: a form posts every field, in its own spelling (`--p v` for `--p=v`,
    categories in their list order), and an unchanged one must not make running instances outdated."""
    def same(name: str, value) -> bool:
        stored = getattr(model, name)
        if name == "backend_parameters":
            return as_separate_arguments(list(stored or [])) == as_separate_arguments(list(value or []))
        if name == "categories":
            return sorted(stored or []) == sorted(value or [])
        return stored == value

    return {name: value for name, value in validated.items() if not same(name, value)}


def parameter_rows(params: list[str]) -> list[tuple[str, str]]:
    """`--p=v`, `--flag`, or `--p` then `v` as (parameter, value) rows."""
    rows: list[tuple[str, str]] = []
    i = 0
    while i < len(params):
        name, eq, value = params[i].partition("=")
        if not eq and i + 1 < len(params) and not params[i + 1].startswith("-"):
            value = params[i + 1]
            i += 1
        rows.append((name, value))
        i += 1
    return rows


def form_values(data: dict | Model | None) -> dict:
    """What the form shows: a model's fields, posted data being corrected, or the defaults of a new model."""
    if data is None:
        data = {"source": SourceChoices.HUGGINGFACE, "replicas": 1, "placement_strategy": "spread",
                "cpu_offloading": True, "distributed_inference_across_workers": True, "restart_on_error": True}
    if isinstance(data, Model):
        data = {f: getattr(data, f) for f in (*TEXT_FIELDS, "source", "replicas", "categories", "placement_strategy",
                                              "worker_selector", "gpu_selector", "backend_parameters", "env", *FLAGS,
                                              "sleep_after_minutes", "requests_per_minute")}
    gpu_ids = (data.get("gpu_selector") or {}).get("gpu_ids") or []
    return {**{f: data.get(f, "") for f in TEXT_FIELDS}, **{f: bool(data.get(f)) for f in FLAGS},
            "source": data.get("source") or SourceChoices.HUGGINGFACE, "replicas": data.get("replicas", 1),
            "categories": list(data.get("categories") or []), "placement_strategy": data.get("placement_strategy"),
            "scheduling": "manual" if data.get("gpu_selector") else "auto", "gpu_ids": list(gpu_ids),
            "selector_rows": list((data.get("worker_selector") or {}).items()) or [("", "")],
            "param_rows": parameter_rows(list(data.get("backend_parameters") or [])) or [("", "")],
            "env_rows": list((data.get("env") or {}).items()) or [("", "")],
            "sleep_after_minutes": data.get("sleep_after_minutes") or "",
            "requests_per_minute": data.get("requests_per_minute") or "",
            "all_categories": CategoryChoices.choices}
