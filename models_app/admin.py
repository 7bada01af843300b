from django import forms
from django.contrib import admin, messages
from django.db.models import Count, Q
from django.utils.html import format_html
from django.utils.translation import gettext_lazy as _

from models_app import actions
from models_app.choices import InstanceState
from models_app.models import Model, ModelInstance
from models_app.validation import validate_model

admin.site.site_header = admin.site.site_title = _("aiMindServe administration")
admin.site.index_title = _("Back office")


def state_badge(state: str, label: str):
    return format_html('<span style="color:#fff;background:{};padding:1px 6px;border-radius:4px">{}</span>',
                       InstanceState.colour(state), label)


class ModelInstanceInline(admin.TabularInline):
    model = ModelInstance
    fields = ["name", "worker", "gpu_indexes", "port", "state", "state_message", "error_kind", "backend_version",
              "restart_count", "next_restart_at", "config_version"]
    readonly_fields = fields
    extra = 0
    can_delete = False
    show_change_link = True

    def has_add_permission(self, request, obj=None):
        return False


class ModelAdminForm(forms.ModelForm):
    """The admin's model form refuses what the API refuses, with the same messages, next to the same fields."""

    class Meta:
        model = Model
        fields = "__all__"

    def clean(self):
        cleaned = super().clean()
        editing = self.instance.pk is not None
        fields = self.changed_data if editing else list(cleaned)
        data = {f: cleaned[f] for f in fields if f in cleaned}
        validated, errors = validate_model(data, instance=self.instance if editing else None, partial=editing)
        for field, problems in errors.items():
            target = field if field in self.fields and field not in self.errors else None
            for problem in problems:
                self.add_error(target, problem if target else f"{field}: {problem}")
        cleaned.update({f: v for f, v in validated.items() if f in cleaned})  # "4096", not 4096, as the API stores
        return cleaned


@admin.register(Model)
class ModelAdmin(admin.ModelAdmin):
    form = ModelAdminForm
    list_display = ["name", "source", "source_display", "replicas", "ready", "backend", "placement_strategy",
                    "updated_at"]
    list_filter = ["source", "backend", "placement_strategy", "cpu_offloading", "asleep"]
    search_fields = ["name", "description", "huggingface_repo_id", "model_scope_model_id", "local_path"]
    inlines = [ModelInstanceInline]
    actions = ["stop_models", "start_models"]
    fieldsets = [
        (None, {"fields": ["name", "description", "replicas", "categories"]}),
        ("Source", {"fields": ["source", "huggingface_repo_id", "huggingface_filename", "model_scope_model_id",
                               "model_scope_file_path", "local_path"]}),
        ("Placement", {"fields": ["placement_strategy", "worker_selector", "gpu_selector", "cpu_offloading",
                                  "distributed_inference_across_workers"]}),
        ("Backend", {"fields": ["backend", "backend_version", "backend_parameters", "env", "restart_on_error"]}),
        ("Sleep when idle", {"fields": ["sleep_after_minutes", "asleep", "last_request_at"]}),
        (_("Rate limit"), {"fields": ["requests_per_minute"]}),
    ]
    readonly_fields = ["asleep", "last_request_at"]

    def get_queryset(self, request):
        return super().get_queryset(request).annotate(
            ready_replicas_count=Count("instances", filter=Q(instances__state=InstanceState.RUNNING)))

    @admin.display(description="ready", ordering="ready_replicas_count")
    def ready(self, obj):
        return f"{obj.ready_replicas}/{obj.replicas}"

    def save_model(self, request, obj, form, change):
        if change:  # the form already wrote into `obj`: compare with the stored model, or nothing looks changed
            stored = Model.objects.get(pk=obj.pk)
            actions.do_update_model(stored, {f: form.cleaned_data[f] for f in form.changed_data},
                                    by=request.user.get_username())
        else:
            obj.pk = actions.do_create_model(**{f: form.cleaned_data[f] for f in form.cleaned_data}).pk

    def delete_model(self, request, obj):
        actions.do_delete_model(obj, by=request.user.get_username())

    def delete_queryset(self, request, queryset):
        for model in queryset:
            actions.do_delete_model(model, by=request.user.get_username())

    @admin.action(description="Stop (replicas → 0)")
    def stop_models(self, request, queryset):
        for model in queryset:
            actions.do_scale_model(model, 0, by=request.user.get_username())
        messages.success(request, f"Stopped {queryset.count()} model(s).")

    @admin.action(description="Start (replicas → 1)")
    def start_models(self, request, queryset):
        for model in queryset:
            actions.do_scale_model(model, 1, by=request.user.get_username())
        messages.success(request, f"Started {queryset.count()} model(s).")


@admin.register(ModelInstance)
class ModelInstanceAdmin(admin.ModelAdmin):
    list_display = ["name", "model", "worker", "gpu_indexes", "port", "state_label", "state_message", "error_kind",
                    "backend", "backend_version", "restart_count", "next_restart_at", "is_outdated", "updated_at"]
    list_filter = ["state", "error_kind", "backend", "model", "worker"]
    search_fields = ["name", "model__name", "worker__name", "state_message"]
    readonly_fields = [f.name for f in ModelInstance._meta.fields if f.name != "backend_api_key"]
    exclude = ["backend_api_key"]
    change_form_template = "admin/models_app/modelinstance/change_form.html"

    def has_add_permission(self, request):
        return False

    @admin.display(description="state", ordering="state")
    def state_label(self, obj):
        label = obj.get_state_display()
        if obj.state == InstanceState.DOWNLOADING:
            label = f"{label} {obj.download_progress:.0f}%"
        return state_badge(obj.state, label)

    @admin.display(description="outdated", boolean=True)
    def is_outdated(self, obj):
        return obj.outdated

    def delete_model(self, request, obj):
        actions.do_delete_instance(obj, by=request.user.get_username())

    def delete_queryset(self, request, queryset):
        for instance in queryset:
            actions.do_delete_instance(instance, by=request.user.get_username())
