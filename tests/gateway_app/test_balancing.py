"""Requests go to the least busy running replica (equally busy ones in turn); a replica that refuses the connection
passes the request on to another, and one that keeps refusing is passed over until its health check passes
(test_failing_replica_health.py)."""

import asyncio
import json

import pytest
from asgiref.sync import async_to_sync

from gateway_app.models import ApiKey
from gateway_app.routing import note_failure, note_success, pick
from gateway_app.tables import TABLES, Replica, Route
from tests.gateway_app.fake_backend import APP, CHAT, FakeBackend, call, deploy, free_port, serving

pytestmark = pytest.mark.django_db


def route(*outstanding: int) -> Route:
    return Route(1, "m", [Replica(n, "127.0.0.1", 41000 + n, "llama-box", "", outstanding=o)
                          for n, o in enumerate(outstanding)])


def test_the_least_busy_replica_is_picked():
    assert pick(route(2, 0, 1)).instance_id == 1
    assert pick(route(3, 3, 1, 2)).instance_id == 2


def test_equally_busy_replicas_take_turns():
    r = route(0, 1, 0)
    assert [pick(r).instance_id for _ in range(4)] == [2, 0, 2, 0]


def test_a_replica_that_keeps_failing_is_passed_over_even_when_it_once_answers(settings):
    settings.GATEWAY_REPLICA_FAILURES = 3
    r = route(0, 5, 7)
    failing = r.replicas[0]

    @async_to_sync
    async def run():
        for _ in range(2):
            note_failure(failing)
        picks = [pick(r)]  # two failures: still the least busy
        note_failure(failing)
        picks += [pick(r), pick(r, tried={1}), pick(r, tried={1, 2})]
        note_success(failing)  # the last resort worked once: only its health check lets it back
        picks.append(pick(r))
        checking = failing.health_check is not None and not failing.health_check.done()
        return picks, checking

    picks, checking = run()
    # Three failures: passed over, busy as the others are; with nothing else left, better a try than no answer.
    assert [p.instance_id for p in picks] == [0, 1, 2, 0, 1]
    assert failing.skipped_at and checking


def test_a_long_answer_keeps_new_requests_off_its_replica(admin_user):
    key = ApiKey.issue(admin_user, "k")[1]

    @async_to_sync
    async def run():
        slow, other = FakeBackend("slow", stream_pieces=5, piece_delay=0.2), FakeBackend("other")
        async with serving("tiny", slow, other):
            first = await call(APP, "POST", "/v1/chat/completions", key=key, json_body={**CHAT, "model": "tiny"})
            long = asyncio.ensure_future(call(APP, "POST", "/v1/chat/completions", key=key,
                                              json_body={**CHAT, "stream": True}))
            while not (slow.busy or other.busy):
                await asyncio.sleep(0.01)
            busy = slow if slow.busy else other
            idle = other if busy is slow else slow
            before = len(idle.received)
            quick = [await call(APP, "POST", "/v1/chat/completions", key=key, json_body=CHAT) for _ in range(4)]
            assert busy.busy == 1  # the long answer is still under way
            await long
        return first, quick, len(idle.received) - before, [json.loads(q["body"])["served_by"] for q in quick]

    first, quick, idle_served, served_by = run()
    assert first["status"] == 200 and all(q["status"] == 200 for q in quick)
    assert idle_served == 4 and len(set(served_by)) == 1


def test_requests_spread_over_equally_busy_replicas(admin_user):
    key = ApiKey.issue(admin_user, "k")[1]

    @async_to_sync
    async def run():
        backends = [FakeBackend(f"b{n}", answer_delay=0.1) for n in range(2)]
        async with serving("tiny", *backends):
            await asyncio.gather(*(call(APP, "POST", "/v1/chat/completions", key=key, json_body=CHAT)
                                   for _ in range(6)))
        return [len(b.received) for b in backends], [b.most_busy for b in backends]

    served, most_busy = run()
    assert served == [3, 3] and most_busy == [3, 3]


def test_a_refused_connection_goes_to_another_replica_and_the_refuser_is_then_skipped(admin_user, settings):
    settings.GATEWAY_REPLICA_FAILURES = 3
    key = ApiKey.issue(admin_user, "k")[1]

    @async_to_sync
    async def run():
        live = FakeBackend("live")
        async with serving("tiny", free_port(), live):
            answers = [await call(APP, "POST", "/v1/chat/completions", key=key, json_body=CHAT) for _ in range(10)]
        return answers, len(live.received)

    answers, served = run()
    assert [a["status"] for a in answers] == [200] * 10 and served == 10
    refuser = next(r for r in TABLES.snapshot.routes["tiny"].replicas if r.failures)
    assert refuser.failures == 3  # tried three times, then no more while its health check fails
    assert refuser.skipped_at


def test_when_every_replica_refuses_the_answer_is_502(admin_user):
    key = ApiKey.issue(admin_user, "k")[1]
    deploy("tiny", [free_port(), free_port()])
    answer = async_to_sync(call)(APP, "POST", "/v1/chat/completions", key=key, json_body=CHAT)
    assert answer["status"] == 502
    assert json.loads(answer["body"])["error"]["code"] == "upstream_unreachable"
