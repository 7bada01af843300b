"""Resources (SPEC §5): workers with their memory as bars, their labels and reserved memory, which an operator edits
here; GPUs."""

from __future__ import annotations

from django.contrib import messages
from django.shortcuts import get_object_or_404, redirect, render
from django.utils.translation import gettext as _
from django.views import View
from django.views.generic import TemplateView

from models_app.validation import flatten_errors
from models_app.views import AdminRequiredMixin
from scheduler_app.scheduler import build_pool
from workers_app import actions
from workers_app.models import Worker
from workers_app.serializers import WorkerLabelsSerializer
from workers_app.sizes import format_size, parse_size


def share(used: int, total: int) -> int:
    """Percent for a bar, 0..100."""
    return max(0, min(100, round(100 * used / total))) if total else 0


def worker_rows(workers: list[Worker]) -> list[dict]:
    pool = build_pool(workers)
    rows = []
    for worker in workers:
        memory = worker.status.get("memory") or {}
        res = pool[worker.id]
        gpus = []
        for gpu in worker.gpus:
            memory_of_gpu = gpu.get("memory") or {}
            total, used = int(memory_of_gpu.get("total") or 0), int(memory_of_gpu.get("used") or 0)
            index = int(gpu.get("index", 0))
            others = res.gpu_others.get(index, 0)
            gpus.append({"index": index, "name": gpu.get("name", ""), "total": total, "used": used,
                         "percent": share(used, total), "claimed": res.gpu_total.get(index, 0)
                         - res.gpu_free.get(index, 0) - others, "free": res.gpu_free.get(index, 0),
                         "others": others, "others_percent": share(min(others, used), total),
                         "own_percent": max(0, share(used, total) - share(min(others, used), total))})
        ram_total, ram_used = int(memory.get("total") or 0), int(memory.get("used") or 0)
        cpu = worker.status.get("cpu") or {}
        rows.append({"worker": worker, "cpu_percent": max(0, min(100, int(cpu.get("utilization") or 0))),
                     "ram_total": ram_total, "ram_used": ram_used,
                     "ram_percent": share(ram_used, ram_total), "ram_claimed": res.ram_total - res.ram_free,
                     "gpus": gpus, "labels": sorted(worker.labels.items()),
                     "reserved_ram": int((worker.system_reserved or {}).get("ram") or 0),
                     "reserved_vram": int((worker.system_reserved or {}).get("vram") or 0)})
    return rows


class ResourcesView(AdminRequiredMixin, TemplateView):
    template_name = "workers/resources.html"
    extra_context = {"nav": "resources"}
    permissions = ("workers_app.view_worker",)

    def get_context_data(self, **kwargs):
        rows = worker_rows(list(Worker.objects.order_by("name")))
        return {**super().get_context_data(**kwargs), "rows": rows, "has_gpus": any(r["gpus"] for r in rows)}


RESERVED_FIELDS = (("reserved_ram", "ram"), ("reserved_vram", "vram"))


class WorkerLabelsView(AdminRequiredMixin, View):
    """Edit a worker's labels (rows of key and value) and the memory it keeps for itself (`system_reserved`)."""

    template_name = "workers/labels.html"
    permissions = ("workers_app.change_worker",)

    def page(self, request, worker: Worker, rows, reserved: dict[str, str], errors: list[str], status: int = 200):
        return render(request, self.template_name, {"worker": worker, "rows": rows, "reserved": reserved,
                                                    "errors": errors, "nav": "resources"}, status=status)

    def get(self, request, pk: int):
        worker = get_object_or_404(Worker, pk=pk)
        current = worker.system_reserved or {}
        reserved = {field: format_size(int(current.get(key) or 0)) for field, key in RESERVED_FIELDS}
        return self.page(request, worker, sorted(worker.labels.items()) or [("", "")], reserved, [])

    def post(self, request, pk: int):
        worker = get_object_or_404(Worker, pk=pk)
        keys, values = request.POST.getlist("label_key"), request.POST.getlist("label_value")
        rows = [(k.strip(), v.strip()) for k, v in zip(keys, values, strict=False) if k.strip() or v.strip()]
        reserved_text = {field: request.POST.get(field, "").strip() or "0" for field, _ in RESERVED_FIELDS}
        errors = []
        reserved = dict(worker.system_reserved or {})
        for field, key in RESERVED_FIELDS:
            try:
                reserved[key] = parse_size(reserved_text[field])
            except ValueError as exc:
                label = _("Reserved RAM") if key == "ram" else _("Reserved VRAM per GPU")
                errors.append(f"{label}: {exc}")
        serializer = WorkerLabelsSerializer(worker, data={"labels": dict(rows), "system_reserved": reserved},
                                            partial=True)
        if not errors and not serializer.is_valid():
            errors = [f"{k}: {m}" for k, v in serializer.errors.items() for m in flatten_errors(v)]
        if any(not k for k, _ in rows):
            errors.append(_("Every label needs a key."))
        if errors:
            return self.page(request, worker, rows or [("", "")], reserved_text, errors, status=400)
        actions.do_update_worker(worker, {"labels": serializer.validated_data["labels"],
                                          "system_reserved": serializer.validated_data["system_reserved"]})
        messages.success(request, _("%(name)s saved.") % {"name": worker.name})
        return redirect("resources")
