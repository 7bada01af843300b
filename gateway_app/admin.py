from django.contrib import admin, messages

from gateway_app.models import ApiKey


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    list_display = ["name", "key_prefix", "user", "created_at", "last_used_at"]
    search_fields = ["name", "key_prefix", "user__username"]
    list_filter = ["user"]
    fields = ["name", "user"]

    def save_model(self, request, obj, form, change):
        if change:
            obj.save()
            return
        key, raw = ApiKey.issue(form.cleaned_data["user"], form.cleaned_data["name"])
        obj.pk = key.pk
        messages.warning(request, f"New API key (shown only once): {raw}")
