"""Prometheus metrics at `/metrics` (bearer AIMIND_METRICS_TOKEN; 404 while it is unset).

Every server process may serve a scrape, so nothing is kept per process: the state of the cluster (instances,
workers, their resources) is read from the database at scrape time, and what only events tell (the gateway's
requests, latencies and tokens, scheduler passes, backend restarts) is added up in Redis hashes by whoever saw it:
the gateway adds its counts with each usage flush (AIMIND_GATEWAY_USAGE_FLUSH_INTERVAL), the scheduler after each
pass, the lifecycle on each restart. With Redis out of reach those counters are left out of the scrape, not
invented.
"""

from __future__ import annotations

import hmac
import logging
from collections import defaultdict

import redis
from django.conf import settings
from django.db.models import Count
from django.http import Http404, HttpResponse
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, SummaryMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

logger = logging.getLogger(__name__)

GATEWAY_KEY = "aimind:metrics:gateway"  # "<model>\x1f<field>" → number
SCHEDULER_KEY = "aimind:metrics:scheduler"
RESTARTS_KEY = "aimind:metrics:restarts"  # model → restarts
SEP = "\x1f"
# Seconds: the gateway's latency histogram (the whole answer; a stream's end included).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


def _redis() -> redis.Redis | None:
    from gateway_app.changes import redis_client

    return redis_client()


def bucket_of(seconds: float) -> int:
    """The index of the first bucket the latency fits in (len(LATENCY_BUCKETS) for +Inf)."""
    for index, bound in enumerate(LATENCY_BUCKETS):
        if seconds <= bound:
            return index
    return len(LATENCY_BUCKETS)


def add_gateway(served: dict[tuple[str, str], list], tokens: dict[str, list[int]]) -> None:
    """Add a web process's counts: `served` (model, status class) → [requests, latency sum, count per bucket…];
    `tokens` model → [prompt, completion]. Raises redis.RedisError when Redis is out of reach."""
    client = _redis()
    if client is None or not (served or tokens):
        return
    pipe = client.pipeline(transaction=False)
    for (model, status), (requests, seconds, *buckets) in served.items():
        pipe.hincrby(GATEWAY_KEY, f"{model}{SEP}requests{SEP}{status}", requests)
        pipe.hincrbyfloat(GATEWAY_KEY, f"{model}{SEP}seconds", seconds)
        for index, count in enumerate(buckets):
            if count:
                pipe.hincrby(GATEWAY_KEY, f"{model}{SEP}bucket{SEP}{index}", count)
    for model, (prompt, completion) in tokens.items():
        if prompt:
            pipe.hincrby(GATEWAY_KEY, f"{model}{SEP}prompt_tokens", prompt)
        if completion:
            pipe.hincrby(GATEWAY_KEY, f"{model}{SEP}completion_tokens", completion)
    pipe.execute()


def _best_effort(what: str, write) -> None:
    try:
        client = _redis()
        if client is not None:
            write(client)
    except redis.RedisError as exc:
        logger.warning("could not count %s for /metrics (Redis: %s)", what, exc)


def note_scheduler_pass(seconds: float, placed: int) -> None:
    def write(client):
        pipe = client.pipeline(transaction=False)
        pipe.hincrby(SCHEDULER_KEY, "passes", 1)
        pipe.hincrbyfloat(SCHEDULER_KEY, "seconds", seconds)
        pipe.hincrby(SCHEDULER_KEY, "placed", placed)
        pipe.execute()

    _best_effort("a scheduler pass", write)


def note_restart(model_name: str) -> None:
    _best_effort("a restart", lambda client: client.hincrby(RESTARTS_KEY, model_name, 1))


class ClusterCollector:
    """Everything, read when scraped."""

    def collect(self):
        yield from self._instances()
        yield from self._workers()
        try:
            client = _redis()
            if client is not None:
                gateway, scheduler, restarts = (client.hgetall(GATEWAY_KEY), client.hgetall(SCHEDULER_KEY),
                                                client.hgetall(RESTARTS_KEY))
                yield from self._gateway(gateway)
                yield from self._scheduler(scheduler)
                yield from self._restarts(restarts)
        except redis.RedisError as exc:
            logger.warning("/metrics without the event counters: Redis is out of reach (%s)", exc)

    @staticmethod
    def _instances():
        from models_app.choices import InstanceState
        from models_app.models import ModelInstance

        family = GaugeMetricFamily("aimind_instances", "Model instances by model and state.",
                                   labels=["model", "state"])
        counts = {(model, state): n for model, state, n in ModelInstance.objects.values_list(
            "model__name", "state").annotate(n=Count("id")).order_by()}
        for model in sorted({model for model, _ in counts}):
            for state in InstanceState.values:  # every state named: one that empties reads 0 rather than vanishing
                family.add_metric([model, state], counts.get((model, state), 0))
        yield family

    @staticmethod
    def _workers():
        from workers_app.models import Worker

        states = GaugeMetricFamily("aimind_workers", "Workers by state.", labels=["state"])
        ram = GaugeMetricFamily("aimind_worker_ram_bytes", "A worker's RAM.", labels=["worker", "kind"])
        cpu = GaugeMetricFamily("aimind_worker_cpu_utilization_percent", "A worker's CPU use.", labels=["worker"])
        gpu_memory = GaugeMetricFamily("aimind_worker_gpu_memory_bytes", "A GPU's memory.",
                                       labels=["worker", "gpu", "kind"])
        gpu_use = GaugeMetricFamily("aimind_worker_gpu_utilization_percent", "A GPU's core use.",
                                    labels=["worker", "gpu"])
        by_state = defaultdict(int)
        for name, state, status in Worker.objects.order_by("name").values_list("name", "state", "status"):
            by_state[state] += 1
            status = status or {}
            memory = status.get("memory") or {}
            ram.add_metric([name, "total"], int(memory.get("total") or 0))
            ram.add_metric([name, "used"], int(memory.get("used") or 0))
            cpu.add_metric([name], float((status.get("cpu") or {}).get("utilization") or 0))
            for gpu in status.get("gpus") or []:
                index = str(gpu.get("index"))
                gpu_memory.add_metric([name, index, "total"], int((gpu.get("memory") or {}).get("total") or 0))
                gpu_memory.add_metric([name, index, "used"], int((gpu.get("memory") or {}).get("used") or 0))
                gpu_use.add_metric([name, index], float((gpu.get("core") or {}).get("utilization") or 0))
        for state, n in sorted(by_state.items()):
            states.add_metric([state], n)
        yield from (states, ram, cpu, gpu_memory, gpu_use)

    @staticmethod
    def _gateway(raw: dict):
        per_model: dict[str, dict] = defaultdict(lambda: {"requests": {}, "buckets": [0] * (len(LATENCY_BUCKETS) + 1),
                                                          "seconds": 0.0, "prompt_tokens": 0,
                                                          "completion_tokens": 0})
        for field, value in raw.items():
            model, name, *rest = field.decode().split(SEP)
            entry = per_model[model]
            if name == "requests":
                entry["requests"][rest[0]] = int(value)
            elif name == "bucket":
                index = int(rest[0])
                if 0 <= index < len(entry["buckets"]):
                    entry["buckets"][index] = int(value)
            elif name == "seconds":
                entry["seconds"] = float(value)
            elif name in ("prompt_tokens", "completion_tokens"):
                entry[name] = int(value)
        requests = CounterMetricFamily("aimind_gateway_requests", "Requests the gateway answered for a model, by "
                                                                  "status class.", labels=["model", "status"])
        latency = HistogramMetricFamily("aimind_gateway_request_duration_seconds", "Time to the whole answer.",
                                        labels=["model"])
        tokens = CounterMetricFamily("aimind_gateway_tokens", "Tokens the backends reported.",
                                     labels=["model", "kind"])
        for model, entry in sorted(per_model.items()):
            for status, n in sorted(entry["requests"].items()):
                requests.add_metric([model, status], n)
            running, buckets = 0, []
            for bound, count in zip((*LATENCY_BUCKETS, float("inf")), entry["buckets"], strict=True):
                running += count
                buckets.append(("+Inf" if bound == float("inf") else repr(bound), running))
            latency.add_metric([model], buckets, entry["seconds"])
            tokens.add_metric([model, "prompt"], entry["prompt_tokens"])
            tokens.add_metric([model, "completion"], entry["completion_tokens"])
        yield from (requests, latency, tokens)

    @staticmethod
    def _scheduler(raw: dict):
        passes = SummaryMetricFamily("aimind_scheduler_pass_seconds", "Scheduler passes and the time they took.")
        passes.add_metric([], int(raw.get(b"passes") or 0), float(raw.get(b"seconds") or 0))
        placed = CounterMetricFamily("aimind_scheduler_placements", "Instances the scheduler placed.")
        placed.add_metric([], int(raw.get(b"placed") or 0))
        yield from (passes, placed)

    @staticmethod
    def _restarts(raw: dict):
        family = CounterMetricFamily("aimind_backend_restarts", "Backend restarts after a failure, by model.",
                                     labels=["model"])
        for model, n in sorted(raw.items()):
            family.add_metric([model.decode()], int(n))
        yield family


def metrics_view(request):
    token = settings.METRICS_TOKEN
    if not token:
        raise Http404("metrics are off: set AIMIND_METRICS_TOKEN")
    given = request.headers.get("Authorization", "")
    if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
        response = HttpResponse("Send 'Authorization: Bearer <AIMIND_METRICS_TOKEN>'.\n", status=401,
                                content_type="text/plain; charset=utf-8")
        response["WWW-Authenticate"] = 'Bearer realm="metrics"'
        return response
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ClusterCollector())
    return HttpResponse(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)
