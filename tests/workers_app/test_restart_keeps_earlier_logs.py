"""Each start of an instance's backend (an attempt) keeps a log of its own: a restart does not overwrite the lines
that said why the previous run died. The last AIMIND_INSTANCE_LOG_ATTEMPTS are kept, as files on the worker and as
streams in Redis; the API lists them (start, end, exit code) and serves each one, and so does the logs page."""

import pytest
import redis
from django.test import Client

from models_app import actions
from models_app.models import ModelInstance
from tests.fixtures.redis_server import running_redis
from workers_app import logs

pytestmark = pytest.mark.django_db


@pytest.fixture
def instance(admin_user):
    actions.do_create_model(name="crashy", source="local_path", local_path="/m.gguf")
    return ModelInstance.objects.get()


@pytest.fixture
def client(admin_user):
    client = Client()
    client.force_login(admin_user)
    return client


def crash(instance_id: int, path, conn=None, shipper=None, keep=3, code=1) -> int:
    """One attempt as the worker runs it: begun, its backend writes its start-up and the cause, it exits."""
    attempt = logs.begin_attempt(instance_id, path, conn, keep=keep)
    if shipper is not None:
        shipper.start_at_end(instance_id, path, attempt)
    with open(path, "a") as f:
        f.write(f"=== starting: llama-server (attempt {attempt})\nloading model\n")
        f.write(f"error: out of memory in attempt {attempt}\n")
    if shipper is not None:
        shipper.ship(instance_id, path)
    logs.end_attempt(instance_id, path, attempt, code, f"exited with code {code}", conn)
    return attempt


def test_each_start_gets_its_own_file_and_the_oldest_beyond_the_limit_go(instance, client, settings):
    path = logs.log_path(instance.pk)  # the server's own data dir: read from files when there is no Redis
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("a log from before attempts were counted\n")
    assert [crash(instance.pk, path) for _ in range(5)] == [1, 2, 3, 4, 5]

    kept = sorted(p.name for p in path.parent.glob(f"{instance.pk}.*"))
    assert kept == [f"{instance.pk}.attempt-3.log", f"{instance.pk}.attempt-4.log", f"{instance.pk}.attempts.json",
                    f"{instance.pk}.log"]
    assert "error: out of memory in attempt 5" in path.read_text()
    assert "attempt 4" in logs.attempt_path(path, 4).read_text() and "attempt 5" not in \
        logs.attempt_path(path, 4).read_text()

    listed = client.get(f"/api/v1/instances/{instance.pk}/logs/attempts").json()
    assert [(a["attempt"], a["exit_code"], a["exit"], a["current"]) for a in listed] == [
        (5, 1, "exited with code 1", True), (4, 1, "exited with code 1", False), (3, 1, "exited with code 1", False)]
    assert all(a["started_at"] and a["ended_at"] for a in listed)
    third = client.get(f"/api/v1/instances/{instance.pk}/logs", {"attempt": 3})
    assert third.status_code == 200 and third.text.splitlines()[-1] == "error: out of memory in attempt 3"
    gone = client.get(f"/api/v1/instances/{instance.pk}/logs", {"attempt": 1})
    assert gone.status_code == 404 and gone.json() == {"attempt": [f"attempt 1 of {instance.name} is not kept "
                                                                   f"(kept: 5, 4, 3)"]}


@pytest.fixture
def redis_conn(tmp_path, settings):
    with running_redis(tmp_path) as url:
        settings.REDIS_URL = url
        conn = redis.Redis.from_url(url, decode_responses=True)
        yield conn
        conn.close()


def test_attempts_live_in_redis_for_every_server_and_the_page_offers_them(instance, client, redis_conn, tmp_path):
    path = logs.log_path(instance.pk, tmp_path / "worker")  # a worker's data dir: the server reads Redis only
    shipper = logs.LogShipper(redis_conn)
    for _ in range(4):
        crash(instance.pk, path, redis_conn, shipper, code=134)
    running = logs.begin_attempt(instance.pk, path, redis_conn, keep=3)
    shipper.start_at_end(instance.pk, path, running)
    path.write_text("=== starting: llama-server\nserver is listening\n")
    shipper.ship(instance.pk, path)

    assert running == 5
    assert not redis_conn.exists(logs.attempt_key(instance.pk, 2))  # beyond the last 3: dropped
    listed = client.get(f"/api/v1/instances/{instance.pk}/logs/attempts").json()
    assert [(a["attempt"], a["exit_code"], a["current"]) for a in listed] == [(5, None, True), (4, 134, False),
                                                                              (3, 134, False)]
    assert listed[0]["ended_at"] is None and listed[0]["exit"] == ""
    earlier = client.get(f"/api/v1/instances/{instance.pk}/logs", {"attempt": 4}).text
    assert earlier.splitlines() == ["=== starting: llama-server (attempt 4)", "loading model",
                                    "error: out of memory in attempt 4"]
    live = client.get(f"/api/v1/instances/{instance.pk}/logs", {"tail": 4}).text.splitlines()
    assert live == ["loading model", "error: out of memory in attempt 4", "=== starting: llama-server",
                    "server is listening"]  # the live log runs on across starts

    page = client.get(f"/instances/{instance.pk}/logs/").content.decode()
    assert '<label for="attempt">Attempt</label>' in page and 'data-live="/ws/' in page
    assert '<option value="4">4 · started ' in page and "exited with code 134" in page
    shown = client.get(f"/instances/{instance.pk}/logs/", {"attempt": 3}).content.decode()
    assert "error: out of memory in attempt 3" in shown and 'data-live="/ws/' not in shown
    assert '<option value="3" selected>' in shown
    download = client.get(f"/instances/{instance.pk}/logs/download", {"attempt": 3})
    assert download["Content-Disposition"] == f'attachment; filename="{instance.name}.attempt-3.log"'
    assert download.content.decode().endswith("error: out of memory in attempt 3\n")
    assert client.get(f"/instances/{instance.pk}/logs/", {"attempt": 1}).status_code == 404
    zh = client.get(f"/instances/{instance.pk}/logs/", HTTP_ACCEPT_LANGUAGE="zh-hans").content.decode()
    assert '<label for="attempt">尝试</label>' in zh

    logs.forget([instance.pk])  # the instance is deleted: its attempts go with it
    assert not redis_conn.keys(f"aimind:logs:{instance.pk}*")


def test_a_worker_that_lost_redis_still_keeps_and_counts_its_attempts(instance, tmp_path, settings):
    path = logs.log_path(instance.pk, tmp_path)
    unreachable = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)
    assert [crash(instance.pk, path, unreachable) for _ in range(2)] == [1, 2]
    assert "attempt 1" in logs.attempt_path(path, 1).read_text()
