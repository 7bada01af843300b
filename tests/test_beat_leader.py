"""Every server runs a beat; one at a time sends the periodic tasks, and another takes over when it dies."""

import time

import pytest
import redis

from aimind.beat import LOCK_KEY, LeaderLock
from tests.fixtures.redis_server import running_redis


@pytest.fixture
def client(tmp_path):
    with running_redis(tmp_path) as url:
        connection = redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)
        yield connection
        connection.close()


def test_one_beat_leads_and_keeps_leading_while_it_renews(client):
    first, second = LeaderLock(client, ttl=1.0, identity="a"), LeaderLock(client, ttl=1.0, identity="b")
    assert first.hold() and not second.hold()
    for _ in range(4):  # renewed every third of its life: it never lapses
        time.sleep(0.35)
        assert first.hold() and not second.hold()
    assert client.get(LOCK_KEY) == b"a"


def test_when_the_leader_dies_another_takes_over_after_the_lock_expires(client):
    first, second = LeaderLock(client, ttl=0.5, identity="a"), LeaderLock(client, ttl=0.5, identity="b")
    assert first.hold()
    deadline = time.monotonic() + 5
    while not second.hold():  # `first` stopped renewing: it died
        assert time.monotonic() < deadline, "the lock never passed on"
        time.sleep(0.05)
    assert client.get(LOCK_KEY) == b"b"
    assert not first.hold()  # back from the dead, it does not lead again, nor extend the other's lease
    assert not first.held and client.get(LOCK_KEY) == b"b"


def test_a_leader_that_stops_cleanly_hands_over_at_once(client):
    first, second = LeaderLock(client, ttl=30.0, identity="a"), LeaderLock(client, ttl=30.0, identity="b")
    assert first.hold()
    first.release()
    assert second.hold()
    first.release()  # no longer its lock: left alone
    assert client.get(LOCK_KEY) == b"b"


def test_without_redis_no_beat_leads(tmp_path):
    with running_redis(tmp_path) as url:
        lock = LeaderLock(redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5), ttl=5.0)
        assert lock.hold()
    assert not lock.hold()  # the server is gone: the lease cannot be renewed, so this beat pauses
    assert not lock.held
