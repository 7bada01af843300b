from django.contrib import admin
from django.utils.html import format_html

from workers_app import actions
from workers_app.models import Worker
from workers_app.resources_display import human_bytes


@admin.register(Worker)
class WorkerAdmin(admin.ModelAdmin):
    list_display = ["name", "ip", "state_label", "cpu", "ram", "gpu_summary", "labels", "last_heartbeat_at"]
    list_filter = ["state"]
    search_fields = ["name", "hostname", "ip"]
    readonly_fields = ["name", "hostname", "ip", "status", "state", "state_message", "last_heartbeat_at",
                       "created_at", "updated_at"]
    fields = ["name", "hostname", "ip", "labels", "system_reserved", "status", "state", "state_message",
              "last_heartbeat_at", "created_at", "updated_at"]

    def has_add_permission(self, request):
        return False  # workers join themselves with the cluster token

    @admin.display(description="state", ordering="state")
    def state_label(self, obj):
        return format_html('<span style="color:#fff;background:{};padding:1px 6px;border-radius:4px">{}</span>',
                           obj.state_colour, obj.get_state_display())

    @admin.display(description="CPU cores")
    def cpu(self, obj):
        return obj.cpu_cores

    @admin.display(description="RAM")
    def ram(self, obj):
        return human_bytes(obj.ram_total)

    @admin.display(description="GPUs")
    def gpu_summary(self, obj):
        return ", ".join(f"{g.get('index')}: {g.get('name', '')} {human_bytes((g.get('memory') or {}).get('total', 0))}"
                         for g in obj.gpus) or "—"

    def save_model(self, request, obj, form, change):
        actions.do_update_worker(obj, {f: form.cleaned_data[f] for f in form.changed_data})

    def delete_model(self, request, obj):
        actions.do_delete_worker(obj)

    def delete_queryset(self, request, queryset):
        for worker in queryset:
            actions.do_delete_worker(worker)
