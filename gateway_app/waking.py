"""Models that sleep when idle start on demand, cluster-wide: a request for a model that sleeps and has no running
replica wakes it (through the database: whichever web process comes first creates its instances, once) and waits
for a replica to appear in the tables, at most AIMIND_GATEWAY_WAKE_TIMEOUT seconds; past that the route answers 503
`model_waking` with Retry-After. Each route's admission step calls `wait_for_replica` (gateway_app.proxy.admit).

Also the other half of idleness: the last request per model, kept by the usage meter and written with its flush
(`Model.last_request_at`, never moved backwards), which the beat's check reads."""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db.models import Q

from gateway_app import usage
from gateway_app.tables import TABLES, Route, done_with_database

logger = logging.getLogger(__name__)
RETRY_AFTER_SECONDS = 10  # what a client that got `model_waking` is told to wait before it asks again
RETRY_AFTER = (b"retry-after", str(RETRY_AFTER_SECONDS).encode())
WAKE_AGAIN_AFTER = 1.0  # seconds: the requests of one process waiting for the same sleeping model ask the database once
_woken_at: dict[int, float] = {}  # model id → when this process last asked to wake it (monotonic)


def waking_message(name: str) -> str:
    return (f"The model '{name}' is starting (it sleeps when idle) and has no running instance yet; "
            f"retry in {RETRY_AFTER_SECONDS} s.")


def _wake(model_id: int) -> bool:
    from models_app.actions import do_wake_model

    try:
        return do_wake_model(model_id)
    finally:
        done_with_database()


async def wait_for_replica(route: Route) -> Route:
    """For a route with no running replica that `wakes`: wake its model if it is asleep, then the route as soon as a
    replica runs, or as it is (no replica) after GATEWAY_WAKE_TIMEOUT seconds."""
    name = route.name
    deadline = time.monotonic() + settings.GATEWAY_WAKE_TIMEOUT
    while not route.replicas:
        now = time.monotonic()
        if route.asleep and now - _woken_at.get(route.model_id, -1e9) >= WAKE_AGAIN_AFTER:
            _woken_at[route.model_id] = now
            try:
                if await sync_to_async(_wake)(route.model_id):
                    logger.info("woke model %s for a request", name)
            except Exception:  # the database is busy or down: keep waiting, the next round asks again
                logger.warning("could not wake model %s", name, exc_info=True)
        left = deadline - time.monotonic()
        if left <= 0:
            break
        await asyncio.sleep(min(settings.GATEWAY_REFRESH_INTERVAL, left))
        await TABLES.recheck()
        current = TABLES.snapshot.routes.get(name)
        if current is None:  # deleted meanwhile
            break
        route = current
    return route


async def flush_last_requests() -> None:
    """Write each model's last request (kept by the meter) to `Model.last_request_at`; kept for the next flush when
    the database cannot be reached."""
    snapshot = TABLES.snapshot
    if snapshot is not None:  # a request still being answered is a use now: its model must not fall asleep under it
        now = time.time()
        for route in snapshot.routes.values():
            if any(replica.outstanding for replica in route.replicas):
                usage.METER.requested[route.name] = now
    requested = usage.METER.take_requested()
    if not requested:
        return
    try:
        await sync_to_async(_write_last_requests)(requested)
    except Exception:
        usage.METER.put_back_requested(requested)
        logger.warning("could not write the models' last requests; keeping them for the next try", exc_info=True)


def _write_last_requests(requested: dict[str, float]) -> None:
    """One UPDATE per model, only where the time is newer than the stored one (several processes write)."""
    from models_app.models import Model

    try:
        for name, when in requested.items():
            at = datetime.fromtimestamp(when, UTC)
            Model.objects.filter(Q(last_request_at__isnull=True) | Q(last_request_at__lt=at), name=name).update(
                last_request_at=at)
    finally:
        done_with_database()
