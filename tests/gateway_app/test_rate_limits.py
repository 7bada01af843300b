"""Rate limits and token budgets: a key over its requests or tokens per minute or tokens per day, or a model over its
requests per minute, is answered 429 in OpenAI's shape with `Retry-After`; the counts live in Redis, shared by every
web process; with Redis down, requests are served."""

import asyncio
import json
import logging
import time

import pytest
import redis
from asgiref.sync import async_to_sync, sync_to_async

from gateway_app import limits, tables
from gateway_app.models import ApiKey
from models_app.models import Model
from tests.gateway_app.fake_backend import APP, CHAT, FakeBackend, call, serving

pytestmark = pytest.mark.django_db


def limited_key(user, name: str, **limits) -> tuple[ApiKey, str]:
    key, raw = ApiKey.issue(user, name, **limits)
    return key, raw


def limit_model(name: str, requests_per_minute: int) -> None:
    model = Model.objects.get(name=name)
    model.requests_per_minute = requests_per_minute
    model.save()


def refusal(answer: dict) -> dict:
    assert answer["status"] == 429, answer
    return json.loads(answer["body"])["error"]


def test_a_key_over_its_requests_per_minute_is_told_when_to_come_back(admin_user, redis_url):
    key, raw = limited_key(admin_user, "team-a", requests_per_minute=3)
    backend = FakeBackend()

    @async_to_sync
    async def run():
        async with serving("tiny", backend):
            statuses = [(await call(APP, "POST", "/v1/chat/completions", key=raw, json_body=CHAT))["status"]
                        for _ in range(3)]
            refused = await call(APP, "POST", "/v1/chat/completions", key=raw, json_body=CHAT)
            key.requests_per_minute = None  # lifted: the tables follow the change, in the background
            await sync_to_async(key.save)()
            deadline = time.monotonic() + 5
            while (lifted := await call(APP, "POST", "/v1/chat/completions", key=raw, json_body=CHAT))["status"] \
                    == 429 and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            return statuses, refused, lifted

    statuses, refused, lifted = run()
    assert statuses == [200, 200, 200]
    error = refusal(refused)
    assert error["code"] == "rate_limit_exceeded" and error["type"] == "requests"
    assert "API key 'team-a' is limited to 3 requests per minute" in error["message"]
    # Three a minute: the bucket gives one back every 20 s.
    assert 1 <= int(refused["headers"]["retry-after"]) <= 20
    assert lifted["status"] == 200
    assert len(backend.received) == 4  # the refused request never reached it


def test_a_key_over_its_tokens_per_minute_waits_for_them_to_drain(admin_user, redis_url):
    _, raw = limited_key(admin_user, "budget", tokens_per_minute=10)

    @async_to_sync
    async def run():
        async with serving("tiny", FakeBackend()):  # each answer: 5 prompt + 7 completion tokens
            # A stream that did not ask for usage counts its 12 tokens too (its timings alone would say 6).
            first = await call(APP, "POST", "/v1/chat/completions", key=raw, json_body={**CHAT, "stream": True})
            return first, await call(APP, "POST", "/v1/chat/completions", key=raw, json_body=CHAT)

    first, second = run()
    assert first["status"] == 200  # under the budget when it came: admitted, its 12 tokens counted after
    error = refusal(second)
    assert error["type"] == "tokens" and "limited to 10 tokens per minute" in error["message"]
    # 12 tokens at 10 a minute: under 10 again once 2 have drained, 12 s later.
    assert 1 <= int(second["headers"]["retry-after"]) <= 12


def test_a_key_over_its_tokens_per_day_waits_for_the_next_day(admin_user, redis_url):
    _, raw = limited_key(admin_user, "daily", tokens_per_day=20)

    @async_to_sync
    async def run():
        async with serving("tiny", FakeBackend()):
            return [await call(APP, "POST", "/v1/chat/completions", key=raw, json_body=CHAT) for _ in range(3)]

    answers = run()
    assert [a["status"] for a in answers[:2]] == [200, 200]  # 0, then 12 used: both under 20
    error = refusal(answers[2])
    assert "limited to 20 tokens per day" in error["message"]
    assert 1 <= int(answers[2]["headers"]["retry-after"]) <= 86400  # until midnight UTC


def test_a_model_over_its_requests_per_minute_refuses_every_key(admin_user, redis_url):
    _, first = limited_key(admin_user, "first")
    _, second = limited_key(admin_user, "second")

    @async_to_sync
    async def run():
        async with serving("tiny", FakeBackend()):
            await sync_to_async(limit_model)("tiny", 2)
            answers = [await call(APP, "POST", "/v1/chat/completions", key=k, json_body=CHAT)
                       for k in (first, second, first, second)]
            return answers

    answers = run()
    assert [a["status"] for a in answers] == [200, 200, 429, 429]
    assert "The model 'tiny' is limited to 2 requests per minute" in refusal(answers[3])["message"]
    assert "retry-after" in answers[2]["headers"]


def test_two_web_processes_count_together(admin_user, redis_url):
    _, raw = limited_key(admin_user, "shared", requests_per_minute=5)
    other_process = type(APP)(APP.fallback)

    def forget_this_process() -> None:
        """What another web process would have: its own tables and its own Redis connections."""
        tables.TABLES.__init__()
        limits.LIMITER.__init__()

    @async_to_sync
    async def run():
        async with serving("tiny", FakeBackend()):
            first = await call(APP, "POST", "/v1/chat/completions", key=raw, json_body=CHAT)
            forget_this_process()
            # Nine at once, through either gateway: four places are left in the key's five.
            rest = await asyncio.gather(*(call(app, "POST", "/v1/chat/completions", key=raw, json_body=CHAT)
                                          for app in [APP, other_process] * 4 + [other_process]))
            return first, rest

    first, rest = run()
    assert first["status"] == 200
    assert sorted(a["status"] for a in rest) == [200] * 4 + [429] * 5


def test_with_redis_down_requests_are_served_and_a_warning_is_logged_once(admin_user, redis_url, caplog):
    _, raw = limited_key(admin_user, "unlucky", requests_per_minute=1)
    try:
        redis.Redis.from_url(redis_url).shutdown(nosave=True)
    except redis.ConnectionError:
        pass  # it went while answering

    @async_to_sync
    async def run():
        async with serving("tiny", FakeBackend()):
            return [(await call(APP, "POST", "/v1/chat/completions", key=raw, json_body=CHAT))["status"]
                    for _ in range(3)]

    with caplog.at_level(logging.WARNING, logger="gateway_app.limits"):
        assert run() == [200, 200, 200]
    warnings = [r for r in caplog.records if r.name == "gateway_app.limits"]
    assert len(warnings) == 1 and "admitting every request" in warnings[0].getMessage()
