import re

from django import forms
from django.contrib import admin, messages
from django.core.validators import MaxValueValidator, MinValueValidator
from django.utils.translation import gettext_lazy as _

from gateway_app.models import LIMIT_FIELDS, MAX_LIMIT, ApiKey, check_allowed_models


class ApiKeyForm(forms.ModelForm):
    """Allowed models typed as names separated by commas (or lines), checked as the API checks them; limits ≥ 1."""

    allowed_models = forms.CharField(
        label=_("Allowed models"), required=False, widget=forms.TextInput(attrs={"size": 60}),
        help_text=_("Names of the models this key may call, separated by commas; blank: every model."))

    class Meta:
        model = ApiKey
        fields = ["name", "user", "scope", "expires_at", *LIMIT_FIELDS]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.initial["allowed_models"] = ", ".join(self.instance.allowed_models or [])
        for name in LIMIT_FIELDS[1:]:
            field = self.fields[name]
            field.validators += [MinValueValidator(1), MaxValueValidator(MAX_LIMIT)]
            field.widget.attrs.update(min=1, placeholder=_("no limit"))
            field.help_text = _("Blank: no limit. More are answered 429 with Retry-After.")

    def clean_allowed_models(self):
        return check_allowed_models([n for n in re.split(r"[,\n]", self.cleaned_data["allowed_models"]) if n.strip()])


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    form = ApiKeyForm
    list_display = ["name", "key_prefix", "user", "scope", "limits", "created_at", "last_used_at", "expires_at",
                    "revoked_at"]
    search_fields = ["name", "key_prefix", "user__username"]
    list_filter = ["user", "scope"]
    fieldsets = [(None, {"fields": ["name", "user", "scope", "expires_at"]}),
                 (_("Quotas and rate limits"), {"fields": list(LIMIT_FIELDS)})]
    actions = ["revoke_keys"]

    @admin.display(description=_("Limits"))
    def limits(self, key: ApiKey) -> str:
        return describe_limits(key) or "—"

    def save_model(self, request, obj, form, change):
        if change:
            obj.save()
            return
        key, raw = ApiKey.issue(form.cleaned_data["user"], form.cleaned_data["name"], form.cleaned_data["scope"],
                                form.cleaned_data.get("expires_at"),
                                **{field: form.cleaned_data.get(field) for field in LIMIT_FIELDS})
        obj.pk = key.pk
        messages.warning(request, f"New API key (shown only once): {raw}")

    @admin.action(description="Revoke (effective at once)")
    def revoke_keys(self, request, queryset):
        for key in queryset:
            key.revoke()
        messages.success(request, f"Revoked {queryset.count()} key(s).")


def describe_limits(key: ApiKey) -> str:
    """A key's limits in a few words, for the admin's list."""
    parts = [f"{getattr(key, field)} {unit}" for field, unit in (
        ("requests_per_minute", _("requests/min")), ("tokens_per_minute", _("tokens/min")),
        ("tokens_per_day", _("tokens/day"))) if getattr(key, field) is not None]
    if key.allowed_models:
        parts.append(str(_("models: %(names)s") % {"names": ", ".join(key.allowed_models)}))
    return " · ".join(str(p) for p in parts)
