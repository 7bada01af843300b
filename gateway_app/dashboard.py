"""The dashboard: who used which model and how fast it answered (the gateway's per-minute counts), and how busy each
worker was (its per-minute samples), over the last hour or day. Charts are drawn in the page by the vendored uPlot
from the series built here."""

from __future__ import annotations

from collections import defaultdict
from datetime import timedelta

from django.db.models import Sum
from django.utils import timezone
from django.views.generic import TemplateView

from aimind.metrics import LATENCY_BUCKETS
from gateway_app.usage import padded
from models_app.views import AdminRequiredMixin

# window → (its span, minutes per chart point)
WINDOWS = {"hour": (timedelta(hours=1), 1), "day": (timedelta(days=1), 10)}
BUCKETS = len(LATENCY_BUCKETS) + 1


def percentile(buckets: list[int], q: float) -> float | None:
    """The q-quantile (0–1) of a latency histogram (counts per LATENCY_BUCKETS, then +Inf), in seconds, interpolated
    within its bucket as Prometheus' histogram_quantile does; None without requests. Past the last bound: that
    bound (the histogram cannot tell more)."""
    total = sum(buckets)
    if not total:
        return None
    rank, seen, lower = q * total, 0, 0.0
    for bound, count in zip((*LATENCY_BUCKETS, None), buckets, strict=True):
        if count and seen + count >= rank:
            if bound is None:
                return LATENCY_BUCKETS[-1]
            return lower + (bound - lower) * (rank - seen) / count
        seen += count
        lower = bound if bound is not None else lower
    return LATENCY_BUCKETS[-1]


def latencies(buckets: list[int]) -> dict:
    """A row's p50 and p95 in milliseconds (None without requests) from its latency histogram."""
    found = {}
    for name, q in (("p50_ms", 0.5), ("p95_ms", 0.95)):
        seconds = percentile(buckets, q)
        found[name] = None if seconds is None else round(seconds * 1000, 1)
    return found


def dashboard_data(window: str) -> dict:
    from gateway_app.models import UsageMinute
    from workers_app.models import WorkerSample

    span, step = WINDOWS[window]
    now = timezone.now().replace(second=0, microsecond=0)
    count = int(span.total_seconds() // 60 // step)
    start = now - timedelta(minutes=step * (count - 1))
    x = [int((start + timedelta(minutes=step * i)).timestamp()) for i in range(count)]

    def point(minute) -> int:
        return min(count - 1, max(0, int((minute - start).total_seconds() // 60 // step)))

    requests: dict[str, list[int]] = defaultdict(lambda: [0] * count)
    tokens: dict[str, list[int]] = defaultdict(lambda: [0] * count)
    models: dict[str, dict] = defaultdict(lambda: {"requests": 0, "errors": 0, "prompt_tokens": 0,
                                                   "completion_tokens": 0, "seconds": 0.0, "buckets": [0] * BUCKETS})
    keys: dict[tuple, dict] = defaultdict(lambda: {"requests": 0, "errors": 0, "prompt_tokens": 0,
                                                   "completion_tokens": 0, "buckets": [0] * BUCKETS})
    # (("key", id) or ("model", name), minute) → [requests, tokens]: for the busiest minute beside each limit
    minutes: dict[tuple, list[int]] = defaultdict(lambda: [0, 0])
    rows = UsageMinute.objects.filter(minute__gte=start).values_list(
        "minute", "model_name", "api_key_id", "api_key__name", "requests", "errors", "prompt_tokens",
        "completion_tokens", "latency_seconds", "latency_buckets")
    for minute, model, key_id, key_name, n, errors, prompt, completion, seconds, buckets in rows:
        at = point(minute)
        requests[model][at] += n
        tokens[model][at] += prompt + completion
        total = models[model]
        total["requests"] += n
        total["errors"] += errors
        total["prompt_tokens"] += prompt
        total["completion_tokens"] += completion
        total["seconds"] += seconds
        buckets = padded(buckets, BUCKETS)
        total["buckets"] = [a + b for a, b in zip(total["buckets"], buckets, strict=True)]
        by_key = keys[(key_id, key_name or "—")]
        by_key["requests"] += n
        by_key["errors"] += errors
        by_key["prompt_tokens"] += prompt
        by_key["completion_tokens"] += completion
        by_key["buckets"] = [a + b for a, b in zip(by_key["buckets"], buckets, strict=True)]
        minutes[(("key", key_id), minute)][0] += n
        minutes[(("key", key_id), minute)][1] += prompt + completion
        minutes[(("model", model), minute)][0] += n
    counted = ("requests", "errors", "prompt_tokens", "completion_tokens")
    model_rows = [{"model": name, **{k: total[k] for k in counted}, **latencies(total["buckets"])}
                  for name, total in sorted(models.items())]
    key_rows = [{"key": name, "id": key_id, **{k: values[k] for k in counted}, **latencies(values["buckets"])}
                for (key_id, name), values in sorted(keys.items(), key=lambda kv: kv[0][1])]
    _add_limits(model_rows, key_rows, minutes)

    load: dict[str, dict[str, list]] = {"cpu": {}, "ram": {}, "gpu": {}, "gpu_memory": {}}  # [sum, n] per point

    def add(chart: str, label: str, at: int, value) -> None:
        if value is None:
            return
        points = load[chart].setdefault(label, [[0.0, 0] for _ in range(count)])
        points[at][0] += value
        points[at][1] += 1

    for worker, minute, cpu_percent, ram_used, ram_total, gpus in WorkerSample.objects.filter(
            minute__gte=start).values_list("worker__name", "minute", "cpu_percent", "ram_used", "ram_total", "gpus"):
        at = point(minute)
        add("cpu", worker, at, cpu_percent)
        add("ram", worker, at, 100 * ram_used / ram_total if ram_total else None)
        for g in gpus or []:
            label = f"{worker}:{g.get('index')}"
            add("gpu", label, at, g.get("utilization"))
            total = g.get("total") or 0
            add("gpu_memory", label, at, 100 * (g.get("used") or 0) / total if total else None)
    cpu, ram, gpu, gpu_memory = ({label: [round(total / n, 1) if n else None for total, n in points]
                                  for label, points in load[chart].items()} for chart in ("cpu", "ram", "gpu",
                                                                                          "gpu_memory"))

    def series(by_label: dict) -> list[dict]:
        return [{"label": label, "values": values} for label, values in sorted(by_label.items())]

    def per_minute(by_label: dict) -> dict:  # a point of the day's chart holds `step` minutes: their mean
        return {label: [round(v / step, 2) for v in values] for label, values in by_label.items()}

    return {"window": window, "models": model_rows, "keys": key_rows, "charts": {
        "x": x, "requests": series(per_minute(requests)),
        "tokens": series(per_minute(tokens)), "cpu": series(cpu), "ram": series(ram),
        "gpu": series(gpu), "gpu_memory": series(gpu_memory)}}


def _add_limits(model_rows: list[dict], key_rows: list[dict], minutes: dict[tuple, list[int]]) -> None:
    """Each row's limits beside what was used of them (`limits`: [{"used", "limit", "per"}]): per minute, the
    window's busiest minute; per day, today (UTC). A key's row also gets its `allowed_models`."""
    from gateway_app.models import ApiKey, Usage
    from models_app.models import Model

    busiest: dict[tuple, list[int]] = defaultdict(lambda: [0, 0])
    for (owner, _minute), (requests, tokens) in minutes.items():
        most = busiest[owner]
        most[0], most[1] = max(most[0], requests), max(most[1], tokens)
    rpm = dict(Model.objects.filter(name__in=[r["model"] for r in model_rows], requests_per_minute__isnull=False)
               .values_list("name", "requests_per_minute"))
    for row in model_rows:
        limit = rpm.get(row["model"])
        row["limits"] = [] if limit is None else [
            {"used": busiest[("model", row["model"])][0], "limit": limit, "per": "rpm"}]
    limits = {pk: rest for pk, *rest in ApiKey.objects.filter(pk__in=[r["id"] for r in key_rows]).values_list(
        "pk", "requests_per_minute", "tokens_per_minute", "tokens_per_day", "allowed_models")}
    today = dict(Usage.objects.filter(day=timezone.now().date(), api_key__in=[
        pk for pk, (*_, per_day, _allowed) in limits.items() if per_day is not None]).values("api_key").annotate(
        tokens=Sum("prompt_tokens") + Sum("completion_tokens")).values_list("api_key", "tokens"))
    for row in key_rows:
        per_minute, tokens_per_minute, per_day, allowed = limits.get(row["id"], (None, None, None, []))
        requests, tokens = busiest[("key", row["id"])]
        row["limits"] = [{"used": used, "limit": limit, "per": per} for used, limit, per in (
            (requests, per_minute, "rpm"), (tokens, tokens_per_minute, "tpm"),
            (today.get(row["id"], 0), per_day, "tpd")) if limit is not None]
        row["allowed_models"] = list(allowed or [])


class DashboardView(AdminRequiredMixin, TemplateView):
    template_name = "dashboard.html"
    extra_context = {"nav": "dashboard"}
    permissions = ("gateway_app.view_usage", "workers_app.view_worker")

    def get_context_data(self, **kwargs):
        window = self.request.GET.get("window", "hour")
        if window not in WINDOWS:
            window = "hour"
        return {**super().get_context_data(**kwargs), **dashboard_data(window), "windows": list(WINDOWS)}
