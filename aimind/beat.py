"""One beat at a time across server processes: each `server`/`up` runs a beat, and only the one holding a lock in
Redis sends the periodic tasks. The holder renews the lock every third of its time to live; when the holder dies (or
loses Redis) the lock expires and another beat takes over within AIMIND_BEAT_LOCK_TTL seconds."""

from __future__ import annotations

import logging
import os
import secrets
import socket

import redis
from django.conf import settings
from django.db import Error as DatabaseError
from django.db import close_old_connections
from django_celery_beat.schedulers import DatabaseScheduler

logger = logging.getLogger("aimind.beat")
LOCK_KEY = "aimind:beat:leader"
# Renew only what is ours: a holder that was too slow must not extend a lock another beat took since.
_RENEW = ("if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) "
          "else return 0 end")
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end"


class LeaderLock:
    """A lease in Redis named by `key`, held by `identity` for `ttl` seconds at a time."""

    def __init__(self, client: redis.Redis, ttl: float, key: str = LOCK_KEY, identity: str | None = None) -> None:
        self.client, self.ttl, self.key = client, ttl, key
        self.identity = identity or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self.held = False

    def hold(self) -> bool:
        """Renew the lease when ours, else take it when free. False (not leading) when Redis cannot be reached."""
        ttl_ms = int(self.ttl * 1000)
        try:
            if self.held and self.client.eval(_RENEW, 1, self.key, self.identity, ttl_ms):
                return True
            now_held = bool(self.client.set(self.key, self.identity, nx=True, px=ttl_ms))
        except (redis.RedisError, OSError) as exc:
            if self.held:
                logger.warning("beat: cannot reach Redis to renew the leader lock (%s); pausing", exc)
            self.held = False
            return False
        if now_held != self.held:
            if now_held:
                logger.warning("beat: this process (%s) leads now and sends the periodic tasks", self.identity)
            else:
                logger.warning("beat: another process leads now (%s)", self.holder())
        self.held = now_held
        return now_held

    def holder(self) -> str:
        try:
            value = self.client.get(self.key)
        except (redis.RedisError, OSError):
            return "unknown"
        return value.decode() if value else "nobody"

    def release(self) -> None:
        if not self.held:
            return
        try:
            self.client.eval(_RELEASE, 1, self.key, self.identity)
        except (redis.RedisError, OSError):
            pass  # it expires by itself
        self.held = False


class LeaderScheduler(DatabaseScheduler):
    """django-celery-beat's scheduler, ticking only while this process holds the leader lock; a database outage
    pauses it (it retries) instead of ending the process."""

    def __init__(self, *args, **kwargs) -> None:
        from gateway_app.changes import redis_client

        client = redis_client()
        self.lock = LeaderLock(client, settings.BEAT_LOCK_TTL) if client is not None else None
        super().__init__(*args, **kwargs)

    def tick(self, *args, **kwargs) -> float:
        renew_every = settings.BEAT_LOCK_TTL / 3
        if self.lock is not None and not self.lock.hold():
            return renew_every
        try:
            return min(super().tick(*args, **kwargs), renew_every)
        except DatabaseError as exc:
            logger.warning("beat: the database cannot be read (%s); trying again in %.0f s", exc, renew_every)
            close_old_connections()
            return renew_every

    def close(self) -> None:
        try:
            super().close()
        finally:
            if self.lock is not None:
                self.lock.release()
