"""The gateway's tables follow the database: a change to a key, a user, a model, an instance or a worker bumps a
version, in this process at once and in Redis once the transaction commits; every web process watches that version
(gateway_app.tables) and reloads when it moves."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import redis
from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import transaction
from django.db.models.signals import post_delete, post_save

logger = logging.getLogger(__name__)
VERSION_KEY = "aimind:gateway:version"
_local = {"version": 0}
_lock = threading.Lock()
_client: dict[str, redis.Redis] = {}


REVOKED_HERE: set[str] = set()  # hashes of keys revoked in this process: refused before its next load is in


def revoked(key_hash: str) -> None:
    """A key was revoked in this process: refused here at once (the tables reload in the background), everywhere
    once the change is committed and seen."""
    REVOKED_HERE.add(key_hash)
    bump()


def local_version() -> int:
    """Bumped by changes made in this process: its readers need not wait for Redis to see them."""
    return _local["version"]


def redis_url() -> str:
    """REDIS_URL, or the embedded Redis that `up` noted in the data dir (a `manage.py` command run beside it)."""
    if settings.REDIS_URL:
        return settings.REDIS_URL
    try:
        return (Path(settings.DATA_DIR) / "run" / "redis.url").read_text().strip()
    except OSError:
        return ""


def bump() -> None:
    """Something the gateway routes by changed: readers in this process reload now, every web process once the
    change is committed (a reload before the commit would read the old rows)."""
    _bump_local()
    transaction.on_commit(_publish)


def _bump_local() -> None:
    with _lock:
        _local["version"] += 1


def redis_client() -> redis.Redis | None:
    """A client of the server's Redis (kept per URL; short timeouts: callers never wait long for it), or None when
    there is none to ask."""
    url = redis_url()
    if not url:
        return None
    client = _client.get(url)
    if client is None:
        client = _client[url] = redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)
    return client


def _publish() -> None:
    _bump_local()
    try:
        client = redis_client()
        if client is None:
            return
        client.incr(VERSION_KEY)
    except redis.RedisError as exc:  # the web processes still reload on their periodic pass
        logger.warning("could not tell the gateway about a change (Redis: %s)", exc)


def _changed(sender, **kwargs) -> None:
    bump()


def connect() -> None:
    """Called once from the app config: the models whose rows decide who may call /v1 and where it goes."""
    from gateway_app.models import ApiKey
    from models_app.lifecycle import instances_moved
    from models_app.models import Model, ModelInstance
    from workers_app.models import Worker

    for model in (ApiKey, get_user_model(), Model, ModelInstance, Worker):
        post_save.connect(_changed, sender=model, dispatch_uid=f"gateway-tables-save-{model.__name__}")
        post_delete.connect(_changed, sender=model, dispatch_uid=f"gateway-tables-delete-{model.__name__}")
    instances_moved.connect(_changed, dispatch_uid="gateway-tables-lifecycle")
