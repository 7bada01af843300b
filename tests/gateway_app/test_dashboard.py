"""The dashboard: per-minute usage from the gateway (requests, errors, tokens, latency histogram) per model and key,
per-minute load samples from workers' heartbeats, and the page that charts them for the last hour or day."""

from datetime import timedelta

import pytest
from asgiref.sync import async_to_sync
from django.test import Client
from django.utils import timezone

from gateway_app.dashboard import dashboard_data, percentile
from gateway_app.models import ApiKey, UsageMinute
from gateway_app.proxy import flush_usage
from tests.factories import gpu_status, make_worker
from tests.gateway_app.fake_backend import APP, CHAT, FakeBackend, call, deploy, serving
from workers_app import actions as worker_actions
from workers_app.models import WorkerSample

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def fresh_samples():
    worker_actions._sampled.clear()  # a rolled-back test's worker ids come back
    yield
    worker_actions._sampled.clear()


def histogram(**counts) -> list[int]:
    """Counts per LATENCY_BUCKETS by bound name (b0 for ≤ 5 ms, b1 for ≤ 10 ms, …, b14 for +Inf)."""
    return [counts.get(f"b{i}", 0) for i in range(15)]


def test_percentiles_are_read_from_the_histogram_as_prometheus_does():
    assert percentile(histogram(), 0.5) is None
    assert percentile(histogram(b0=10), 0.5) == pytest.approx(0.0025)  # half way into (0, 5 ms]
    assert percentile(histogram(b0=50, b2=50), 0.95) == pytest.approx(0.01 + 0.015 * 0.9)  # (10 ms, 25 ms]
    assert percentile(histogram(b14=3), 0.5) == 120.0  # past the last bound: the last bound


def test_the_gateway_counts_each_minute_with_its_errors_and_latency(admin_user):
    key, raw = ApiKey.issue(admin_user, "team")

    @async_to_sync
    async def run():
        async with serving("tiny", FakeBackend()):
            for _ in range(3):
                assert (await call(APP, "POST", "/v1/chat/completions", key=raw, json_body=CHAT))["status"] == 200
            await flush_usage()

    deploy("idle", [])
    run()
    assert async_to_sync(call)(APP, "POST", "/v1/chat/completions", key=raw,
                               json_body={**CHAT, "model": "idle"})["status"] == 503
    async_to_sync(flush_usage)()
    rows = {r.model_name: r for r in UsageMinute.objects.all()}
    tiny, idle = rows["tiny"], rows["idle"]
    assert (tiny.api_key_id, tiny.requests, tiny.errors, tiny.prompt_tokens, tiny.completion_tokens) == \
        (key.pk, 3, 0, 15, 21)
    assert sum(tiny.latency_buckets) == 3 and tiny.latency_seconds > 0
    assert (idle.requests, idle.errors) == (1, 1)


def test_a_heartbeat_leaves_one_sample_per_minute():
    worker = make_worker("w")
    worker_actions.do_heartbeat(worker, gpu_status([24], ram_gib=32))
    worker_actions.do_heartbeat(worker, gpu_status([24], ram_gib=32))
    [sample] = WorkerSample.objects.all()
    assert sample.ram_total == 32 * 1024**3 and sample.gpus[0]["total"] == 24 * 1024**3


def seed(admin_user):
    key, _ = ApiKey.issue(admin_user, "team")
    now = timezone.now().replace(second=0, microsecond=0)
    for ago, model, requests, errors, buckets in ((0, "chat", 4, 1, histogram(b2=4)),
                                                  (5, "chat", 6, 0, histogram(b3=6)),
                                                  (30, "embed", 2, 0, histogram(b0=2)),
                                                  (600, "chat", 9, 0, histogram(b4=9))):
        UsageMinute.objects.create(minute=now - timedelta(minutes=ago), api_key=key, model_name=model,
                                   requests=requests, errors=errors, prompt_tokens=10 * requests,
                                   completion_tokens=20 * requests, latency_buckets=buckets)
    worker = make_worker("w", status=gpu_status([24]))
    for ago, cpu in ((0, 50.0), (2, 25.0)):
        WorkerSample.objects.create(worker=worker, minute=now - timedelta(minutes=ago), cpu_percent=cpu,
                                    ram_used=8 * 1024**3, ram_total=32 * 1024**3,
                                    gpus=[{"index": 0, "used": 0, "total": 24 * 1024**3, "utilization": 70.0}])


def test_the_last_hour_and_the_last_day(admin_user):
    seed(admin_user)
    hour = dashboard_data("hour")
    assert [(m["model"], m["requests"], m["errors"]) for m in hour["models"]] == [("chat", 10, 1), ("embed", 2, 0)]
    chat = hour["models"][0]
    assert 10 < chat["p50_ms"] <= 50 and chat["p95_ms"] <= 50  # within the (10 ms, 50 ms] buckets
    assert hour["keys"] == [{"key": "team", "id": ApiKey.objects.get(name="team").pk, "requests": 12, "errors": 1,
                             "prompt_tokens": 120, "completion_tokens": 240, "p50_ms": 25.0, "p95_ms": 47.5,
                             "limits": [], "allowed_models": []}]
    charts = hour["charts"]
    assert len(charts["x"]) == 60 and charts["x"][-1] - charts["x"][0] == 59 * 60
    requests = {s["label"]: s["values"] for s in charts["requests"]}
    assert requests["chat"][-1] == 4 and requests["chat"][-6] == 6 and sum(requests["chat"]) == 10
    assert {s["label"]: s["values"][-1] for s in charts["cpu"]} == {"w": 50.0}
    assert {s["label"]: s["values"][-3] for s in charts["ram"]} == {"w": 25.0}
    assert [s["label"] for s in charts["gpu"]] == ["w:0"]
    assert {s["label"]: s["values"][-1] for s in charts["gpu_memory"]} == {"w:0": 0.0}
    day = dashboard_data("day")
    assert len(day["charts"]["x"]) == 144 and day["models"][0]["requests"] == 19  # ten hours ago counts


def test_each_api_key_has_its_own_latency_percentiles(admin_user):
    seed(admin_user)
    slow, _ = ApiKey.issue(admin_user, "slow")
    now = timezone.now().replace(second=0, microsecond=0)
    UsageMinute.objects.create(minute=now, api_key=slow, model_name="chat", requests=20,
                               latency_buckets=histogram(b5=10, b7=10))  # half in (100, 250] ms, half in (0.5, 1] s
    UsageMinute.objects.create(minute=now, api_key=None, model_name="chat", requests=0)
    keys = {k["key"]: k for k in dashboard_data("hour")["keys"]}
    # team: 2 under 5 ms, 4 in (10, 25] ms, 6 in (25, 50] ms — the 6th request ends the second bucket
    assert (keys["team"]["p50_ms"], keys["team"]["p95_ms"]) == (25.0, 47.5)
    assert (keys["slow"]["p50_ms"], keys["slow"]["p95_ms"]) == (250.0, 950.0)
    assert (keys["—"]["p50_ms"], keys["—"]["p95_ms"]) == (None, None)  # no requests: no latency to tell
    chat = dashboard_data("hour")["models"][0]
    assert chat["requests"] == 30 and 500 < chat["p95_ms"] <= 1000  # the model's rows mix both keys
    client = Client()
    client.force_login(admin_user)
    page = client.get("/dashboard/").content.decode()
    assert f'<a href="/keys/{slow.pk}/edit/"' in page
    row = page[page.index('<tr data-key="slow">'):]
    assert "<td>250.0 ms</td><td>950.0 ms</td>" in row[:row.index("</tr>")]
    row = page[page.index('<tr data-key="—">'):]
    assert "<td>—</td><td>—</td>" in row[:row.index("</tr>")]


def test_the_page_shows_the_tables_and_carries_the_series(admin_user):
    seed(admin_user)
    client = Client()
    client.force_login(admin_user)
    page = client.get("/dashboard/").content.decode()
    assert '<tr data-model="chat"><td>chat</td><td>10</td><td>1</td>' in page
    assert 'id="dashboard-data"' in page and "uPlot.iife.min.js" in page
    assert 'href="/dashboard/" aria-current="page"' in page
    assert "<td>19</td>" in client.get("/dashboard/?window=day").content.decode()
    zh = client.get("/dashboard/", HTTP_ACCEPT_LANGUAGE="zh-CN").content.decode()
    for word in ("仪表盘", "按模型统计用量", "每分钟请求数", "最近一天"):
        assert word in zh, word
    assert Client().get("/dashboard/")["Location"] == "/login/?next=/dashboard/"
