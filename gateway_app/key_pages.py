"""The API keys page (/keys/): every key with its state, allowed models, limits and today's usage; New key (its secret
shown once), Edit (allowed models and limits), Revoke. A key's fields are judged by the API's own serializer
(gateway_app.api), so the page refuses what POST/PATCH /api/v1/keys refuse, with the same words."""

from __future__ import annotations

from django.contrib import messages
from django.db.models import F, Sum
from django.http import QueryDict
from django.shortcuts import get_object_or_404, redirect, render
from django.utils import timezone
from django.utils.cache import add_never_cache_headers
from django.utils.translation import gettext as _
from django.utils.translation import gettext_lazy as _lazy
from django.views import View
from django.views.generic import TemplateView

from gateway_app.models import LIMIT_FIELDS, ApiKey, KeyScope, Usage
from models_app.views import AdminRequiredMixin

NUMBER_LIMITS = LIMIT_FIELDS[1:]  # requests_per_minute, tokens_per_minute, tokens_per_day
STATES = {"active": _lazy("Active"), "expired": _lazy("Expired"), "revoked": _lazy("Revoked")}


def key_state(key: ApiKey, now=None) -> str:
    if key.revoked_at is not None:
        return "revoked"
    if key.expires_at is not None and key.expires_at <= (now or timezone.now()):
        return "expired"
    return "active"


def key_rows() -> list[dict]:
    """Each key (usable ones first) with its state and what the gateway passed for it today (UTC)."""
    today = {row["api_key"]: row for row in Usage.objects.filter(day=timezone.now().date()).values(
        "api_key").annotate(requests=Sum("requests"), tokens=Sum("prompt_tokens") + Sum("completion_tokens"))}
    now = timezone.now()
    rows = []
    for key in ApiKey.objects.order_by(F("revoked_at").desc(nulls_first=True), "name", "id"):
        state = key_state(key, now)
        used = today.get(key.pk, {})
        rows.append({"key": key, "state": state, "state_label": STATES[state],
                     "requests_today": used.get("requests") or 0, "tokens_today": used.get("tokens") or 0})
    return rows


def key_data_from_post(post: QueryDict, fields: tuple[str, ...]) -> dict:
    """The API's key fields from the form's inputs: blank → no limit (None), no model ticked → every model."""
    data: dict = {}
    for field in fields:
        if field == "allowed_models":
            data[field] = [name for name in post.getlist(field) if name]
        elif field in ("name", "scope"):
            data[field] = post.get(field, "").strip()
        else:
            data[field] = post.get(field, "").strip() or None
    return data


def validate_key(data: dict, key: ApiKey | None = None) -> tuple[dict, dict]:
    """(validated fields, {}) or ({}, {field: [messages]}), as POST (no key) or PATCH /api/v1/keys/{id} judge them."""
    from gateway_app.api import ApiKeySerializer
    from models_app.validation import flatten_errors

    serializer = ApiKeySerializer(key, data=data, partial=key is not None)
    if serializer.is_valid():
        return dict(serializer.validated_data), {}
    return {}, {field: flatten_errors(errors) for field, errors in serializer.errors.items()}


def model_choices(chosen: list[str]) -> list[dict]:
    """Every model's name as a checkbox, and any chosen name no model has (still allowed; marked not deployed)."""
    from models_app.models import Model

    names = list(Model.objects.order_by("name").values_list("name", flat=True))
    return ([{"name": n, "deployed": True, "checked": n in chosen} for n in names]
            + [{"name": n, "deployed": False, "checked": True} for n in chosen if n not in names])


class KeyListView(AdminRequiredMixin, TemplateView):
    template_name = "keys/list.html"
    extra_context = {"nav": "keys"}
    permissions = ("gateway_app.view_apikey",)

    def get_context_data(self, **kwargs):
        return {**super().get_context_data(**kwargs), "rows": key_rows()}


class KeyFormView(AdminRequiredMixin, View):
    """New key (no pk): name, scope, expiry, allowed models, limits; Edit (a key): its allowed models and limits."""

    template_name = "keys/form.html"

    def required_permissions(self) -> tuple[str, ...]:
        return ("gateway_app.change_apikey",) if self.kwargs.get("pk") else ("gateway_app.add_apikey",)

    def get(self, request, pk: int | None = None):
        key = get_object_or_404(ApiKey, pk=pk) if pk else None
        values = ({field: getattr(key, field) for field in LIMIT_FIELDS} if key else
                  {"scope": KeyScope.INFERENCE, "allowed_models": []})
        return self.render(request, key, values, {})

    def post(self, request, pk: int | None = None):
        key = get_object_or_404(ApiKey, pk=pk) if pk else None
        fields = LIMIT_FIELDS if key else ("name", "scope", "expires_at", *LIMIT_FIELDS)
        data = key_data_from_post(request.POST, fields)
        validated, errors = validate_key(data, key)
        if errors:
            return self.render(request, key, data, errors, status=400)
        if key is not None:
            for field, value in validated.items():
                setattr(key, field, value)
            key.save(update_fields=list(validated))  # its post_save tells every gateway process
            messages.success(request, _("API key %(name)s saved.") % {"name": key.name})
            return redirect("keys")
        key, raw = ApiKey.issue(request.user, validated["name"], validated["scope"], validated.get("expires_at"),
                                **{field: validated[field] for field in LIMIT_FIELDS if field in validated})
        response = render(request, "keys/issued.html", {"key": key, "raw": raw, "nav": "keys"})
        add_never_cache_headers(response)  # the secret must not be kept by any cache, nor shown on Back
        return response

    def render(self, request, key: ApiKey | None, values: dict, errors: dict, status: int = 200):
        expires = values.get("expires_at")
        return render(request, self.template_name, {
            "key": key, "values": {**values, "expires_at": expires.strftime("%Y-%m-%dT%H:%M")
                                   if hasattr(expires, "strftime") else expires or ""},
            "errors": errors, "scopes": KeyScope.choices, "models": model_choices(values.get("allowed_models") or []),
            "nav": "keys",
        }, status=status)


class KeyRevokeView(AdminRequiredMixin, View):
    """Revoke: the API's DELETE; the key stops at once (the gateway's tables within a second)."""

    permissions = ("gateway_app.delete_apikey",)

    def post(self, request, pk: int):
        key = get_object_or_404(ApiKey, pk=pk)
        key.revoke()
        messages.success(request, _("API key %(name)s revoked.") % {"name": key.name})
        return redirect("keys")
