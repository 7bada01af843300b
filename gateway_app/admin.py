from django.contrib import admin, messages

from gateway_app.models import ApiKey


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    list_display = ["name", "key_prefix", "user", "scope", "created_at", "last_used_at", "expires_at", "revoked_at"]
    search_fields = ["name", "key_prefix", "user__username"]
    list_filter = ["user", "scope"]
    fields = ["name", "user", "scope", "expires_at"]
    actions = ["revoke_keys"]

    def save_model(self, request, obj, form, change):
        if change:
            obj.save()
            return
        key, raw = ApiKey.issue(form.cleaned_data["user"], form.cleaned_data["name"], form.cleaned_data["scope"],
                                form.cleaned_data.get("expires_at"))
        obj.pk = key.pk
        messages.warning(request, f"New API key (shown only once): {raw}")

    @admin.action(description="Revoke (effective at once)")
    def revoke_keys(self, request, queryset):
        for key in queryset:
            key.revoke()
        messages.success(request, f"Revoked {queryset.count()} key(s).")
