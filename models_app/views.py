"""The product's own pages for models (SPEC §5): Models, Deploy, Edit, an instance's logs. Thin views that call
the actions; a model's fields are judged by the API's own validation."""

from __future__ import annotations

from collections import Counter
from datetime import datetime

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.mixins import LoginRequiredMixin, UserPassesTestMixin
from django.db.models import Count, Prefetch, Q
from django.http import Http404, HttpResponse, JsonResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.template.defaultfilters import filesizeformat
from django.utils.dateparse import parse_datetime
from django.utils.http import content_disposition_header
from django.utils.translation import gettext as _
from django.utils.translation import gettext_lazy as _lazy
from django.views import View
from django.views.generic import TemplateView

from models_app import actions
from models_app.choices import DELETED, InstanceState, PlacementStrategyChoices, SourceChoices
from models_app.forms import changed_fields, form_values, model_data_from_post
from models_app.models import MAX_ID, InstanceEvent, Model, ModelInstance
from models_app.portable import ImportRefused, export_models, import_models
from models_app.validation import validate_model
from workers_app import logs
from workers_app.backends import all_backends


class AdminRequiredMixin(LoginRequiredMixin, UserPassesTestMixin):
    """Every page: a signed-in admin holding the Django permissions the page needs (as the admin site and the API
    ask them). Anonymous visitors go to /login/; anyone else gets 403."""

    permissions: tuple[str, ...] = ()

    def required_permissions(self) -> tuple[str, ...]:
        return self.permissions

    def test_func(self) -> bool:
        user = self.request.user
        return user.is_staff and user.has_perms(self.required_permissions())


def models_with_instances():
    instances = ModelInstance.objects.select_related("worker").order_by("id")
    return (Model.objects.annotate(ready_replicas_count=Count("instances", filter=Q(
        instances__state=InstanceState.RUNNING))).prefetch_related(Prefetch("instances", queryset=instances))
        .order_by("name"))


def state_summary(model: Model) -> list[tuple[str, str, int]]:
    """(state, its label, how many) for the model's instances, most advanced state first."""
    counts = Counter(i.state for i in model.instances.all())
    order = [s for s, _ in InstanceState.choices]
    return [(state, InstanceState(state).label, counts[state]) for state in sorted(counts, key=order.index)]


def model_row_context(model: Model) -> dict:
    return {"model": model, "instances": list(model.instances.all()), "summary": state_summary(model)}


class ModelListView(AdminRequiredMixin, TemplateView):
    template_name = "models/list.html"
    extra_context = {"nav": "models"}
    permissions = ("models_app.view_model", "models_app.view_modelinstance")

    def get_context_data(self, **kwargs):
        from models_app.live import snapshot

        fingerprints = snapshot()  # first: a change after it makes the live socket send the rows again
        rows = [{**model_row_context(m), "fingerprint": fingerprints.get(m.pk, "")} for m in models_with_instances()]
        return {**super().get_context_data(**kwargs), "rows": rows, "sources": SourceChoices.choices}


class ModelExportView(AdminRequiredMixin, View):
    """Every model's settings as `manage.py export_models` writes them: a file to keep (in git, say) and import after
    an upgrade. Env values are in it: keep it private."""

    permissions = ("models_app.view_model",)

    def get(self, request):
        response = HttpResponse(export_models(), content_type="application/yaml; charset=utf-8")
        response["Content-Disposition"] = content_disposition_header(True, "models.yaml")
        return response


IMPORT_MAX_BYTES = 4 * 1024**2


class ModelImportView(AdminRequiredMixin, View):
    """The same import as `manage.py import_models`, from an uploaded file: models created or updated by name, all or
    nothing. Done: back to Models with what changed; refused: the Models page again (400) with the reason."""

    permissions = ("models_app.add_model", "models_app.change_model")

    def post(self, request):
        upload = request.FILES.get("file")
        try:
            if upload is None:
                raise ImportRefused(_("choose a file to import"))
            if upload.size > IMPORT_MAX_BYTES:
                raise ImportRefused(_("the file is %(size)s, larger than %(limit)s") % {
                    "size": filesizeformat(upload.size), "limit": filesizeformat(IMPORT_MAX_BYTES)})
            try:
                text = upload.read().decode("utf-8")
            except UnicodeDecodeError:
                raise ImportRefused(_("the file is not UTF-8 text")) from None
            done = import_models(text)
        except ImportRefused as refused:
            messages.error(request, _("Import refused, nothing was changed: %(reason)s") % {"reason": refused})
            page = ModelListView()
            page.setup(request)
            return render(request, page.template_name, page.get_context_data(), status=400)
        counts = {what: f"{len(names)}" + (f" ({', '.join(names)})" if names else "") for what, names in done.items()}
        messages.success(request, _("Imported %(file)s: created %(created)s, updated %(updated)s, unchanged "
                                    "%(unchanged)s.") % {"file": upload.name, **counts})
        return redirect("models")


class ModelFormView(AdminRequiredMixin, View):
    """Deploy (no model) and Edit (a model): the same form, the API's validation, then the actions."""

    template_name = "models/form.html"

    def required_permissions(self) -> tuple[str, ...]:
        return ("models_app.change_model",) if self.kwargs.get("pk") else ("models_app.add_model",)

    def get(self, request, pk: int | None = None):
        model = get_object_or_404(Model, pk=pk) if pk else None
        values = form_values(model)
        if model is None and request.GET.get("source") in SourceChoices.values:
            values["source"] = request.GET["source"]
        return self.render(request, model, values, {})

    def post(self, request, pk: int | None = None):
        model = get_object_or_404(Model, pk=pk) if pk else None
        data = model_data_from_post(request.POST)
        validated, errors = validate_model(data, instance=model, partial=model is not None)
        if errors:
            return self.render(request, model, form_values(data), errors, status=400)
        if model is None:
            model = actions.do_create_model(**validated)
            messages.success(request, _("Model %(name)s deployed.") % {"name": model.name})
        else:
            actions.do_update_model(model, changed_fields(model, validated), by=request.user.get_username())
            messages.success(request, _("Model %(name)s saved.") % {"name": model.name})
        return redirect("models")

    def render(self, request, model: Model | None, values: dict, errors: dict, status: int = 200):
        return render(request, self.template_name, {
            "model": model, "values": values, "errors": errors, "sources": SourceChoices.choices,
            "strategies": PlacementStrategyChoices.choices, "backends": all_backends(), "gpus": cluster_gpus(),
            "nav": "models",
        }, status=status)


def cluster_gpus() -> list[dict]:
    """Every GPU of the cluster with what is free on it now (the GPU selector's choices)."""
    from scheduler_app.scheduler import build_pool
    from workers_app.models import Worker

    workers = list(Worker.objects.order_by("name"))
    pool = build_pool(workers)
    return [{"id": f"{w.name}:{gpu.get('index')}", "name": gpu.get("name", ""),
             "total": pool[w.id].gpu_total.get(int(gpu.get("index", 0)), 0),
             "free": max(0, pool[w.id].gpu_free.get(int(gpu.get("index", 0)), 0))}
            for w in workers for gpu in w.gpus]


class ModelEvaluateView(AdminRequiredMixin, View):
    """The form as it is filled, judged by the scheduler as POST /api/v1/evaluations would: the live fit line."""

    permissions = ("models_app.add_model",)

    def post(self, request):
        from scheduler_app.api import evaluate_spec
        from workers_app.models import Worker

        data = model_data_from_post(request.POST)
        data["name"] = data["name"] or "evaluation"
        result = evaluate_spec(data, list(Worker.objects.order_by("id")))
        return JsonResponse({**result, "summary": fit_summary(result)})


def fit_summary(result: dict) -> str:
    placement = result.get("placement")
    if not result.get("compatible") or placement is None:
        return _("Does not fit: %(reason)s") % {"reason": result.get("message", "")}
    claim = placement["computed_resource_claim"]
    vram = sum(int(v) for v in (claim.get("vram") or {}).values())
    where = placement["worker_name"] + (f" (GPU {', '.join(map(str, placement['gpu_indexes']))})"
                                        if placement["gpu_indexes"] else "")
    if claim.get("unknown"):
        return _("Fits on %(where)s; resource claim unknown (the server cannot read the model).") % {"where": where}
    sizes = {"where": where, "ram": filesizeformat(claim.get("ram") or 0), "vram": filesizeformat(vram)}
    if not vram:
        return _("Fits on %(where)s: claims %(ram)s RAM.") % sizes
    return _("Fits on %(where)s: claims %(ram)s RAM and %(vram)s VRAM.") % sizes


class ModelActionView(AdminRequiredMixin, View):
    """Stop (replicas → 0), Start (replicas → 1), Delete: POST from the Models page."""

    def required_permissions(self) -> tuple[str, ...]:
        return ("models_app.delete_model",) if self.kwargs.get("action") == "delete" else ("models_app.change_model",)

    def post(self, request, pk: int, action: str):
        model = get_object_or_404(Model, pk=pk)
        by = request.user.get_username()
        if action == "stop":
            actions.do_scale_model(model, 0, by=by)
            messages.success(request, _("Model %(name)s stopped.") % {"name": model.name})
        elif action == "start":
            actions.do_scale_model(model, 1, by=by)
            messages.success(request, _("Model %(name)s started.") % {"name": model.name})
        elif action == "delete":
            actions.do_delete_model(model, by=by)
            messages.success(request, _("Model %(name)s deleted.") % {"name": model.name})
        return redirect("models")


class InstanceDeleteView(AdminRequiredMixin, View):
    permissions = ("models_app.delete_modelinstance",)

    def post(self, request, pk: int):
        instance = get_object_or_404(ModelInstance, pk=pk)
        actions.do_delete_instance(instance, by=request.user.get_username())
        messages.success(request, _("Instance %(name)s deleted; a new one replaces it.") % {"name": instance.name})
        return redirect("models")


class InstanceLogsView(AdminRequiredMixin, TemplateView):
    template_name = "models/logs.html"
    extra_context = {"nav": "models"}
    permissions = ("models_app.view_modelinstance",)

    def get_context_data(self, pk: int, **kwargs):
        """The live log; or with `?attempt=N` one earlier start's own log, as it was kept (no live lines)."""
        instance = get_object_or_404(ModelInstance.objects.select_related("model", "worker"), pk=pk)
        attempts = [{**a, "started": parse_datetime(a.get("started_at") or "")} for a in logs.attempts(instance.pk)]
        chosen = chosen_attempt(self.request, attempts)
        lines = logs.attempt_lines(instance.pk, chosen, logs.STREAM_MAX_LINES) if chosen else None
        return {**super().get_context_data(**kwargs), "instance": instance, "attempts": attempts, "chosen": chosen,
                "lines": lines}


def chosen_attempt(request, attempts: list[dict]) -> int | None:
    """The kept attempt `?attempt=N` names (None: the live log; an unknown number is a 404)."""
    raw = request.GET.get("attempt", "")
    if not raw:
        return None
    if not raw.isdigit() or int(raw) not in {a["attempt"] for a in attempts}:
        raise Http404(_("Attempt %(attempt)s is not kept.") % {"attempt": raw})
    return int(raw)


# The words of an instance's timeline: what each recorded cause means to a person (models_app.lifecycle's causes).
CAUSE_LABELS = {
    "analyzing": _lazy("Reading the model's metadata"), "placed": _lazy("Placed"), "no_fit": _lazy("Waiting for room"),
    "hub_unreachable": _lazy("Hub unreachable"), "scheduler_error": _lazy("Scheduling failed"),
    "interrupted": _lazy("Scheduling interrupted"), "download": _lazy("Downloading"),
    "install": _lazy("Installing the backend"), "start": _lazy("Starting"), "healthy": _lazy("Running"),
    "failed": _lazy("Failed"), "refused": _lazy("Refused for good"), "restart": _lazy("Restarting"),
    "moved": _lazy("Placed again"), "stuck": _lazy("Stuck, placed again"), "worker_lost": _lazy("Worker lost"),
    "worker_back": _lazy("Worker back"), "worker_returned": _lazy("Worker back"),
    "worker_restarted": _lazy("Worker restarted"), "worker_stopped": _lazy("Worker stopped"),
    "worker_removed": _lazy("Worker removed"), "part_failed": _lazy("A part failed"),
    "part_lost": _lazy("A part's worker was lost"), "over_claim": _lazy("Uses more than it claimed"),
    "outdated": _lazy("Configuration changed"),
    "answers_probe": _lazy("Worker silent, backend still answers"),
    "made_room": _lazy("Idle models put to sleep to make room"),
    "health_failed": _lazy("Health check failed"), "deleted": _lazy("Deleted"),
}
TIMELINE_EVENTS = 200  # the last ones shown


def timeline(instance_id: int) -> list[InstanceEvent]:
    """The instance's last TIMELINE_EVENTS events, oldest first, each with its `label` and, for a failure that
    booked a restart, `restart_in` (seconds after the failure; 0: at once)."""
    events = list(InstanceEvent.objects.filter(instance_id=instance_id).order_by("-id")[:TIMELINE_EVENTS])[::-1]
    for event in events:
        event.label = CAUSE_LABELS.get(event.cause, event.cause)
        event.restart_in = (max(0.0, (event.restart_at - event.time).total_seconds())
                            if event.restart_at is not None else None)
    return events


class InstanceDetailView(AdminRequiredMixin, TemplateView):
    """One instance: where it runs and why there, what it claims, and its history as a timeline. A deleted instance
    (its row is gone, its history kept) gets a page of its history alone, ending in Deleted."""

    template_name = "models/instance.html"
    extra_context = {"nav": "models"}
    permissions = ("models_app.view_modelinstance",)

    def get_template_names(self):
        return ["models/instance_deleted.html" if self.instance is None else self.template_name]

    def get(self, request, *args, pk: int, **kwargs):
        if pk > MAX_ID:
            raise Http404(_("No instance %(id)s, and no history of one.") % {"id": pk})
        self.instance = ModelInstance.objects.select_related("model", "worker").filter(pk=pk).first()
        return super().get(request, *args, pk=pk, **kwargs)

    def get_context_data(self, pk: int, **kwargs):
        instance = self.instance
        events = timeline(pk)
        if instance is None:
            gone = InstanceEvent.objects.filter(instance_id=pk, to_state=DELETED).order_by("-id").first()
            if gone is None:
                raise Http404(_("No instance %(id)s, and no history of one.") % {"id": pk})
            model_id = gone.details.get("model_id")
            return {**super().get_context_data(**kwargs), "gone": gone, "events": events, "instance_id": pk,
                    "model_exists": bool(model_id) and Model.objects.filter(pk=model_id).exists(),
                    "retention_days": f"{settings.EVENT_RETENTION_DAYS:g}"}
        claim = instance.computed_resource_claim or {}
        measured = instance.measured or {}
        indexes = sorted({*(claim.get("vram") or {}), *(measured.get("vram") or {})},
                         key=lambda i: (not str(i).isdigit(), int(i) if str(i).isdigit() else 0, str(i)))
        memory = [(_("RAM"), claim.get("ram"), measured.get("ram"))] + [
            (f"GPU {i}", (claim.get("vram") or {}).get(i), (measured.get("vram") or {}).get(i)) for i in indexes]
        return {**super().get_context_data(**kwargs), "instance": instance, "events": events, "memory": memory,
                "claim_unknown": bool(claim.get("unknown")), "measured": measured, "measured_at": _moment(measured),
                "why": instance.placement_explanation or {}}


DELETED_SHOWN = 200  # the newest ones listed


class DeletedInstancesView(AdminRequiredMixin, TemplateView):
    """Instances deleted within AIMIND_EVENT_RETENTION_DAYS (all, or one model's with `?model=ID`), newest first:
    each links to its kept history."""

    template_name = "models/deleted.html"
    extra_context = {"nav": "models"}
    permissions = ("models_app.view_modelinstance",)

    def get_context_data(self, **kwargs):
        found = InstanceEvent.objects.filter(to_state=DELETED).order_by("-id")
        raw = self.request.GET.get("model", "")
        model_id = int(raw) if raw.isascii() and raw.isdigit() else None
        if model_id is not None:
            found = found.filter(details__model_id=model_id)
        gone = list(found[:DELETED_SHOWN])
        model_name = gone[0].details.get("model_name") if gone and model_id is not None else ""
        if model_id is not None and not model_name:
            model_name = Model.objects.filter(pk=model_id).values_list("name", flat=True).first() or ""
        return {**super().get_context_data(**kwargs), "gone": gone, "model_id": model_id, "model_name": model_name,
                "retention_days": f"{settings.EVENT_RETENTION_DAYS:g}"}


def _moment(measured: dict) -> datetime | None:
    """When the worker measured it (stored as ISO 8601 text), for the page to show as a time."""
    try:
        return datetime.fromisoformat(measured["at"])
    except (KeyError, TypeError, ValueError):
        return None


class InstanceLogDownloadView(AdminRequiredMixin, View):
    permissions = ("models_app.view_modelinstance",)

    def get(self, request, pk: int):
        instance = get_object_or_404(ModelInstance, pk=pk)
        chosen = chosen_attempt(request, logs.attempts(instance.pk))
        if chosen:
            lines = logs.attempt_lines(instance.pk, chosen, logs.STREAM_MAX_LINES) or []
        else:
            lines = logs.last_lines(instance.pk, logs.STREAM_MAX_LINES)
        response = HttpResponse("\n".join(lines) + ("\n" if lines else ""), content_type="text/plain; charset=utf-8")
        name = f"{instance.name}.attempt-{chosen}.log" if chosen else f"{instance.name}.log"
        response["Content-Disposition"] = content_disposition_header(True, name)
        return response
