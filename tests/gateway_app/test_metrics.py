"""/metrics in the Prometheus text format, behind AIMIND_METRICS_TOKEN: instance and worker state from the
database, the gateway's requests, latencies and tokens by model, scheduler passes and backend restarts from Redis;
the counters move after requests."""

import pytest
from asgiref.sync import async_to_sync, sync_to_async
from django.test import Client
from prometheus_client.parser import text_string_to_metric_families

from gateway_app.models import ApiKey
from gateway_app.proxy import flush_usage
from models_app import actions, lifecycle
from models_app.models import ModelInstance
from scheduler_app.scheduler import pending_instance_ids, schedule_instances
from tests.factories import gpu_status, make_worker
from tests.gateway_app.fake_backend import APP, CHAT, FakeBackend, call, serving

pytestmark = pytest.mark.django_db
TOKEN = "prometheus-secret"


def scrape() -> dict[tuple[str, tuple], float]:
    response = Client().get("/metrics", HTTP_AUTHORIZATION=f"Bearer {TOKEN}")
    assert response.status_code == 200 and response["Content-Type"].startswith("text/plain; version=")
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(response.content.decode()) for sample in family.samples}


def test_metrics_are_off_without_a_token_and_need_it_when_on(settings):
    settings.METRICS_TOKEN = ""
    assert Client().get("/metrics").status_code == 404
    settings.METRICS_TOKEN = TOKEN
    assert Client().get("/metrics").status_code == 401
    assert Client().get("/metrics", HTTP_AUTHORIZATION="Bearer wrong").status_code == 401
    assert Client().get("/metrics", HTTP_AUTHORIZATION=f"Bearer {TOKEN}").status_code == 200


def test_the_gateways_counters_move_after_requests(admin_user, redis_url, settings):
    settings.METRICS_TOKEN = TOKEN
    _, raw = ApiKey.issue(admin_user, "k")

    @async_to_sync
    async def chat_and_scrape():
        backend, scrapes = FakeBackend(), []
        async with serving("tiny", backend):
            for times in (2, 3):
                for _ in range(times):
                    await call(APP, "POST", "/v1/chat/completions", key=raw, json_body=CHAT)
                await flush_usage()
                scrapes.append(await sync_to_async(scrape)())
        return scrapes

    first, again = chat_and_scrape()
    assert first[("aimind_gateway_requests_total", (("model", "tiny"), ("status", "2xx")))] == 2
    assert first[("aimind_gateway_tokens_total", (("kind", "prompt"), ("model", "tiny")))] == 10
    assert first[("aimind_gateway_tokens_total", (("kind", "completion"), ("model", "tiny")))] == 14
    assert first[("aimind_gateway_request_duration_seconds_count", (("model", "tiny"),))] == 2
    assert first[("aimind_gateway_request_duration_seconds_bucket", (("le", "+Inf"), ("model", "tiny")))] == 2
    assert first[("aimind_gateway_request_duration_seconds_sum", (("model", "tiny"),))] > 0
    assert again[("aimind_gateway_requests_total", (("model", "tiny"), ("status", "2xx")))] == 5
    assert again[("aimind_gateway_tokens_total", (("kind", "completion"), ("model", "tiny")))] == 35


def test_instances_workers_passes_and_restarts(admin_user, redis_url, settings, tmp_path,
                                               django_capture_on_commit_callbacks):
    from tests.fixtures.tiny_gguf import write_tiny_llama

    settings.METRICS_TOKEN = TOKEN
    make_worker("g", status=gpu_status([24], ram_gib=32))
    model = actions.do_create_model(name="m", source="local_path", local_path=str(write_tiny_llama(
        tmp_path / "m.gguf")), replicas=2)
    schedule_instances(pending_instance_ids())
    first, second = ModelInstance.objects.filter(model=model).order_by("id")
    lifecycle.do_begin_start(first, "g", pid=1, port=2)
    lifecycle.do_mark_running(first)
    lifecycle.do_fail_instance(first, "backend killed by signal SIGKILL", from_states=["running"])
    with django_capture_on_commit_callbacks(execute=True):
        assert lifecycle.do_restart_instance(ModelInstance.objects.get(pk=first.pk))
    found = scrape()
    assert found[("aimind_instances", (("model", "m"), ("state", "scheduled")))] == 2
    assert found[("aimind_instances", (("model", "m"), ("state", "running")))] == 0
    assert found[("aimind_workers", (("state", "ready"),))] == 1
    assert found[("aimind_worker_ram_bytes", (("kind", "total"), ("worker", "g")))] == 32 * 1024**3
    assert found[("aimind_worker_gpu_memory_bytes", (("gpu", "0"), ("kind", "total"), ("worker", "g")))] \
        == 24 * 1024**3
    assert found[("aimind_scheduler_pass_seconds_count", ())] >= 1
    assert found[("aimind_scheduler_placements_total", ())] == 2
    assert found[("aimind_backend_restarts_total", (("model", "m"),))] == 1


def test_without_redis_the_database_part_still_answers(settings):
    settings.METRICS_TOKEN = TOKEN
    settings.REDIS_URL = "redis://127.0.0.1:1/0"  # nothing listens there
    make_worker("g")
    found = scrape()
    assert found[("aimind_workers", (("state", "ready"),))] == 1
    assert not any(name.startswith("aimind_gateway") for name, _ in found)
