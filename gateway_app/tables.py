"""What /v1 needs to know, held in memory in each web process: the usable API keys and the routing table (model
name → its running replicas). Reloaded from the database (three queries, off the event loop) when the version that
gateway_app.changes bumps moves, and every GATEWAY_RELOAD_EVERY seconds in any case. A request waits for the
database only before the first load, or when its key or model is not found (at most one load a second for those);
every other check and load runs in the background while requests answer from the snapshot at hand. With Redis or the
database down the last tables keep serving, and are read again once a second until the database answers."""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis.asyncio
from asgiref.sync import sync_to_async
from django.conf import settings

from gateway_app import changes
from gateway_app.models import hash_key

logger = logging.getLogger(__name__)
REDIS_RETRY_AFTER = 1.0  # seconds without asking Redis again after it failed to answer
DATABASE_RETRY_AFTER = 1.0  # seconds without reading the tables again after the database failed
RECHECK_EVERY = 1.0  # seconds between two looks for a key or model that is not in the tables
_started_here: contextvars.ContextVar[asyncio.Task | None] = contextvars.ContextVar("started_here", default=None)


@dataclass(frozen=True, slots=True)
class Key:
    id: int
    scope: str
    expires_at: float | None  # epoch seconds
    name: str = ""
    # Its quotas and rate limits (gateway_app.limits); None: no limit.
    allowed_models: frozenset[str] | None = None
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    tokens_per_day: int | None = None
    models_body: bytes | None = None  # GET /v1/models for a key limited to some models (else the snapshot's)


@dataclass(slots=True, eq=False)
class Replica:
    """One running instance as the balancer sees it; its counters live as long as the instance keeps running
    at the same address (a reload keeps the same object)."""

    instance_id: int
    host: str
    port: int
    backend: str
    api_key: str
    outstanding: int = 0  # requests this process has in flight on it
    failures: int = 0  # connection failures in a row
    skipped_at: float = 0.0  # monotonic time since which the balancer passes it over (0: it does not)
    health_check: asyncio.Task | None = None  # asks its health check while it is passed over (gateway_app.routing)
    head: bytes = field(init=False)  # the request header lines that are this replica's own

    def __post_init__(self) -> None:
        self.head = f"host: {self.host}:{self.port}\r\n".encode() + (
            f"authorization: Bearer {self.api_key}\r\n".encode() if self.api_key else b"")


@dataclass(slots=True, eq=False)
class Route:
    model_id: int
    name: str
    replicas: list[Replica] = field(default_factory=list)
    turn: int = 0  # round robin among equally busy replicas
    requests_per_minute: int | None = None  # over all keys (gateway_app.limits)
    asleep: bool = False  # put to sleep when idle: a request wakes it (gateway_app.waking)
    wakes: bool = False  # it sleeps when idle (or is asleep) and has replicas: a request waits for one to run


@dataclass(frozen=True, slots=True)
class Snapshot:
    keys: dict[str, Key]  # by the key's hash
    routes: dict[str, Route]  # by model name, every model (a model with no running instance has no replicas)
    models_body: bytes  # GET /v1/models, rendered once per load

    def key(self, token: str) -> Key | None:
        """The usable key behind a bearer token (not revoked, its user active: else it is not loaded; not expired)."""
        hashed = hash_key(token)
        key = self.keys.get(hashed)
        if key is None or (key.expires_at is not None and key.expires_at <= time.time()) \
                or hashed in changes.REVOKED_HERE:
            return None
        return key


def done_with_database() -> None:
    """As after a request: let go of a broken or expired connection (never inside a transaction: a test's own)."""
    from django.db import connection, reset_queries

    if not connection.in_atomic_block:
        reset_queries()
        connection.close_if_unusable_or_obsolete()


def read_rows() -> dict[str, list]:
    """What the tables are made of, as plain JSON-ready rows (runs in a thread)."""
    from gateway_app.models import ApiKey
    from models_app.actions import STARTING_STATES
    from models_app.choices import InstanceState
    from models_app.models import Model, ModelInstance

    def epoch(moment) -> float | None:
        return moment.timestamp() if moment else None

    try:
        keys = [[pk, key_hash, scope, epoch(expires), *rest] for pk, key_hash, scope, expires, *rest in
                ApiKey.objects.filter(revoked_at__isnull=True, user__is_active=True).values_list(
                    "pk", "key_hash", "scope", "expires_at", "name", "allowed_models", "requests_per_minute",
                    "tokens_per_minute", "tokens_per_day")]
        models = [[pk, name, backend, categories, epoch(created), *rest] for pk, name, backend, categories, created,
                  *rest in Model.objects.order_by("name").values_list(
                      "pk", "name", "backend", "categories", "created_at", "asleep", "sleep_after_minutes",
                      "replicas", "requests_per_minute")]
        running = [list(row) for row in ModelInstance.objects.filter(
            state=InstanceState.RUNNING, port__isnull=False, worker__isnull=False,
        ).order_by("id").values_list("pk", "model_id", "worker__ip", "port", "backend", "backend_api_key")]
        on_their_way = (InstanceState.PENDING, InstanceState.ANALYZING, *STARTING_STATES)
        starting = sorted(set(ModelInstance.objects.filter(state__in=on_their_way).values_list("model_id", flat=True)))
    finally:
        done_with_database()
    return {"keys": keys, "models": models, "running": running, "starting": starting}


def load_snapshot(previous: Snapshot | None = None) -> Snapshot:
    """Read the tables (runs in a thread) and keep a copy on disk for a restart while the database is down.
    Replicas unchanged since `previous` keep their counters."""
    rows = read_rows()
    saved_tables.save(rows)
    return build_snapshot(rows, previous)


def build_snapshot(rows: dict[str, list], previous: Snapshot | None = None) -> Snapshot:
    models, starting = rows["models"], set(rows["starting"])
    kept = {(r.instance_id, r.host, r.port, r.api_key): r for route in (previous.routes.values() if previous else ())
            for r in route.replicas}
    # A request waits for a replica of a model that sleeps only while one can come: it is asleep (the request wakes
    # it) or an instance of it is on its way; a model whose instances failed answers 503 at once.
    routes = {name: Route(pk, name, requests_per_minute=rpm, asleep=asleep,
                          wakes=replicas > 0 and (asleep or (sleep_after is not None and pk in starting)))
              for pk, name, *_, asleep, sleep_after, replicas, rpm in models}
    by_id = {route.model_id: route for route in routes.values()}
    backend_of = {pk: backend for pk, _, backend, *_ in models}
    for pk, model_id, ip, port, backend, api_key in rows["running"]:
        host = "127.0.0.1" if ip in ("", "0.0.0.0") else ip
        replica = kept.get((pk, host, port, api_key)) or Replica(pk, host, port, backend or backend_of[model_id],
                                                                 api_key)
        by_id[model_id].replicas.append(replica)
    listing = [{"id": name, "object": "model", "created": int(created), "owned_by": "aimind",
                "categories": categories, "ready_replicas": len(by_id[pk].replicas)}
               for pk, name, _, categories, created, *_ in models]
    return Snapshot(_keys(rows["keys"], listing), routes, json.dumps({"object": "list", "data": listing}).encode())


class SavedTables:
    """The last rows read, in <data dir>/run/gateway-tables.json (private: it holds the backends' secrets): a web
    process that starts while the database is down serves from them instead of failing every request."""

    def __init__(self) -> None:
        self._written: str | None = None

    @property
    def path(self) -> Path:
        return Path(settings.DATA_DIR) / "run" / "gateway-tables.json"

    def save(self, rows: dict[str, list]) -> None:
        text = json.dumps(rows, separators=(",", ":"))
        if text == self._written:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, temporary = tempfile.mkstemp(dir=self.path.parent, prefix=".gateway-tables.")
            with os.fdopen(fd, "w") as f:  # mkstemp: 0600
                f.write(json.dumps({"saved_at": time.time(), "rows": rows}, separators=(",", ":")))
            os.replace(temporary, self.path)
            self._written = text
        except OSError as exc:
            logger.warning("could not keep a copy of the gateway's tables in %s: %s", self.path, exc)

    def load(self) -> tuple[float, dict[str, list]] | None:
        try:
            saved = json.loads(self.path.read_text())
            return float(saved["saved_at"]), saved["rows"]
        except (OSError, ValueError, KeyError, TypeError):
            return None


saved_tables = SavedTables()


def _keys(rows: list[tuple], listing: list[dict]) -> dict[str, Key]:
    """The keys by hash, with their limits; GET /v1/models rendered once per distinct list of allowed models."""
    bodies: dict[frozenset[str], bytes] = {}
    keys = {}
    for pk, key_hash, scope, expires, name, allowed, rpm, tpm, tpd in rows:  # expires: epoch seconds
        allowed = frozenset(m for m in allowed if isinstance(m, str)) if isinstance(allowed, list) and allowed \
            else None
        body = None
        if allowed is not None:
            body = bodies.get(allowed)
            if body is None:
                body = bodies[allowed] = json.dumps({"object": "list", "data": [
                    entry for entry in listing if entry["id"] in allowed]}).encode()
        keys[key_hash] = Key(pk, scope, expires, name, allowed, rpm, tpm, tpd, body)
    return keys


class Tables:
    """The current snapshot of one process, and how it stays current: a watcher task asks Redis for the version
    every GATEWAY_REFRESH_INTERVAL seconds; without one (no lifespan, a test's own loop) requests start the checks
    when due, and see them through on their way out, after their answer."""

    def __init__(self) -> None:
        self.snapshot: Snapshot | None = None
        self.version: bytes | None = None  # Redis's, when the snapshot was read
        self.local = -1  # this process's change counter, when the snapshot was read
        self.loaded_at = self.checked_at = -1e9
        self.failing_since: float | None = None  # the database could not be read since then (monotonic)
        self._failed_at = -1e9
        self._rechecked_at = -1e9  # when a key or model not found last made this process ask again (monotonic)
        self._redis: dict[int, tuple[asyncio.AbstractEventLoop, str, redis.asyncio.Redis]] = {}
        self._redis_failed_at = -1e9
        self._reload: tuple[asyncio.AbstractEventLoop, asyncio.Task] | None = None
        self._checking: tuple[asyncio.AbstractEventLoop, asyncio.Task] | None = None  # started by a request
        self._watched: asyncio.AbstractEventLoop | None = None  # the loop a watcher runs on

    def _database_failed_lately(self) -> bool:
        return time.monotonic() - self._failed_at < DATABASE_RETRY_AFTER

    async def current(self) -> Snapshot:
        """The snapshot to answer from. Only the first load is waited for: a change made in this process, or a check
        the watcher is late with, starts a check in the background and the request answers from what is here."""
        if self.snapshot is None:
            await self.reload()
        elif (self.local != changes.local_version() and not self._database_failed_lately()) \
                or time.monotonic() - self.checked_at > 3 * settings.GATEWAY_REFRESH_INTERVAL:
            self._check_soon()
        return self.snapshot

    @staticmethod
    def _pending(entry: tuple[asyncio.AbstractEventLoop, asyncio.Task] | None) -> asyncio.Task | None:
        if entry is not None and entry[0] is asyncio.get_running_loop() and not entry[1].done():
            return entry[1]
        return None

    def _check_soon(self) -> None:
        """A check in the background, unless one, or a load, is under way on this loop already."""
        if self._pending(self._checking) is None and self._pending(self._reload) is None:
            loop = asyncio.get_running_loop()
            self._checking = (loop, task := loop.create_task(self._check_quietly()))
            _started_here.set(task)

    async def _check_quietly(self) -> None:
        try:
            await self.check()
        except Exception:
            logger.exception("the gateway could not check its tables; trying again later")

    async def settle(self) -> None:
        """On a request's way out, after its answer: with no watcher on this loop, see the check it started through
        (nothing else would, and the loop may end with the request: a test's own)."""
        task = _started_here.get()
        if task is not None:
            _started_here.set(None)
            loop = asyncio.get_running_loop()
            if self._watched is not loop and task.get_loop() is loop and not task.done():
                await asyncio.shield(task)

    async def check(self) -> None:
        """Reload when Redis's version moved, or when the last load is GATEWAY_RELOAD_EVERY seconds old."""
        remote = await self._remote_version()
        self.checked_at = now = time.monotonic()
        if self._database_failed_lately():
            return  # the database failed a moment ago: serve what we have
        if (remote is not None and remote != self.version) or self.local != changes.local_version() \
                or now - self.loaded_at >= settings.GATEWAY_RELOAD_EVERY:
            await self.reload(remote)

    async def recheck(self) -> bool:
        """A key or a model was not found, or a model has no replica: perhaps it is newer than these tables. Waits
        for a check or load under way; else reads the tables when this process changed something or Redis says
        another did, or, at most once a second, when the tables are a second old (a change by a process that could
        not reach Redis). A flood of unknown keys costs a Redis GET each and one database read a second. True when
        the snapshot changed."""
        before = self.snapshot
        for entry in (self._checking, self._reload):
            if (task := self._pending(entry)) is not None:
                await asyncio.shield(task)
        if self.snapshot is not before or self._database_failed_lately():
            return self.snapshot is not before
        if self.local != changes.local_version():
            await self.reload()
            return self.snapshot is not before
        remote = await self._remote_version()  # one GET: a change another process made is loaded at once
        if remote is not None and remote != self.version:
            await self.reload(remote)
        elif time.monotonic() - self._rechecked_at >= RECHECK_EVERY and \
                time.monotonic() - self.loaded_at >= RECHECK_EVERY:
            self._rechecked_at = time.monotonic()
            await self.reload(remote)
        return self.snapshot is not before

    async def reload(self, remote: bytes | None = None) -> None:
        """One load at a time per loop; concurrent callers wait for the same one."""
        loop = asyncio.get_running_loop()
        if self._reload is not None and self._reload[0] is loop and not self._reload[1].done():
            await asyncio.shield(self._reload[1])
            return
        task = loop.create_task(self._load(remote))
        self._reload = (loop, task)
        await asyncio.shield(task)

    async def _load(self, remote: bytes | None) -> None:
        local = changes.local_version()
        if remote is None:
            remote = await self._remote_version()
        try:
            snapshot = await sync_to_async(load_snapshot)(self.snapshot)
        except Exception as exc:
            if self.snapshot is None:
                self.snapshot = await asyncio.to_thread(self._from_saved_copy, exc)
            self._failed_at = time.monotonic()
            if self.failing_since is None:
                self.failing_since = self._failed_at
                logger.warning("cannot read the gateway's tables from the database (%s); serving the last ones "
                               "until it answers", exc)
            return
        if self.failing_since is not None:
            logger.warning("the database answers again after %.0f s; the gateway's tables are current",
                           time.monotonic() - self.failing_since)
            self.failing_since = None
        self.snapshot, self.version, self.local = snapshot, remote, local
        self.loaded_at = self.checked_at = time.monotonic()

    @staticmethod
    def _from_saved_copy(exc: Exception) -> Snapshot:
        """The first load failed: the copy the last load left on disk, else the failure."""
        saved = saved_tables.load()
        if saved is None:
            raise exc
        saved_at, rows = saved
        logger.warning("cannot read the gateway's tables from the database (%s); serving the copy saved %.0f s ago",
                       exc, time.time() - saved_at)
        return build_snapshot(rows)

    async def _remote_version(self) -> bytes | None:
        if not settings.REDIS_URL or time.monotonic() - self._redis_failed_at < REDIS_RETRY_AFTER:
            return None
        loop, url = asyncio.get_running_loop(), settings.REDIS_URL
        entry = self._redis.get(id(loop))
        if entry is None or entry[0] is not loop or entry[1] != url:
            self._redis = {k: v for k, v in self._redis.items() if not v[0].is_closed()}
            entry = self._redis[id(loop)] = (loop, url, redis.asyncio.Redis.from_url(
                url, socket_timeout=0.5, socket_connect_timeout=0.5))
        try:
            return await entry[2].get(changes.VERSION_KEY) or b"0"
        except (redis.RedisError, OSError) as exc:
            if time.monotonic() - self._redis_failed_at > 60:
                logger.warning("the gateway cannot ask Redis for changes (%s); serving the tables it has", exc)
            self._redis_failed_at = time.monotonic()
            return None

    async def watch(self) -> None:
        """Runs for the life of the process (started by the ASGI lifespan)."""
        loop = self._watched = asyncio.get_running_loop()
        try:
            while True:
                try:
                    await self.check()
                except Exception:
                    logger.exception("the gateway's table watcher failed; trying again")
                await asyncio.sleep(settings.GATEWAY_REFRESH_INTERVAL)
        finally:
            if self._watched is loop:
                self._watched = None


TABLES = Tables()
