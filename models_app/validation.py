"""One validation for every door: the API's serializer decides what a model may be; the pages and the admin ask it
and show its messages next to the fields."""

from __future__ import annotations

from models_app.models import Model


def flatten_errors(errors) -> list[str]:
    """DRF's nested errors (lists, dicts keyed by list index or sub-field) as plain messages."""
    if isinstance(errors, dict):
        return [m for key, value in errors.items()
                for m in (flatten_errors(value) if not isinstance(key, str) or key.isdigit()
                          else [f"{key}: {x}" for x in flatten_errors(value)])]
    if isinstance(errors, list | tuple):
        return [m for item in errors for m in flatten_errors(item)]
    return [str(errors)]


def validate_model(data: dict, instance: Model | None = None, partial: bool = False) -> tuple[dict, dict]:
    """(validated fields, {}) or ({}, {field: [messages]}), exactly as POST/PATCH /api/v1/models would judge them."""
    from models_app.serializers import ModelSerializer

    serializer = ModelSerializer(instance, data=data, partial=partial)
    if serializer.is_valid():
        return dict(serializer.validated_data), {}
    return {}, {field: flatten_errors(messages) for field, messages in serializer.errors.items()}
