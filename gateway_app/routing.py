"""Which running replica serves a request: the one with the fewest requests in flight (ties in turn). A replica whose
connections keep failing is passed over until its backend's health check passes again: this process asks it in the
background, about once a second, while the replica stays in the tables."""

from __future__ import annotations

import asyncio
import logging
import time

from django.conf import settings

from gateway_app.tables import TABLES, Replica, Route
from gateway_app.upstream import answers_health_check

logger = logging.getLogger(__name__)
HEALTH_CHECK_EVERY = 1.0  # seconds between two looks at a passed-over replica's health check
HEALTH_CHECK_TIMEOUT = 1.0  # seconds one look may take
_health_checks: set[asyncio.Task] = set()  # held here: the loop keeps only weak references to its tasks


def pick(route: Route, tried: set[int] = frozenset()) -> Replica | None:
    """The least busy replica not yet tried; a passed-over one only when every other is passed over or tried too
    (better a try than no answer: the one passed over first)."""
    best: list[Replica] = []
    best_load = None
    fallback: list[Replica] = []
    for replica in route.replicas:
        if replica.instance_id in tried:
            continue
        if replica.skipped_at:
            _watch_health(replica)
            fallback.append(replica)
            continue
        if best_load is None or replica.outstanding < best_load:
            best, best_load = [replica], replica.outstanding
        elif replica.outstanding == best_load:
            best.append(replica)
    if not best:
        if not fallback:
            return None
        best = [min(fallback, key=lambda r: r.skipped_at)]
    if len(best) == 1:
        return best[0]
    route.turn += 1
    return best[route.turn % len(best)]


def note_failure(replica: Replica) -> None:
    """A connection to it failed: after GATEWAY_REPLICA_FAILURES in a row it is passed over until its health check
    passes."""
    replica.failures += 1
    if replica.failures >= settings.GATEWAY_REPLICA_FAILURES and not replica.skipped_at:
        replica.skipped_at = time.monotonic()
        logger.warning("instance %s failed %d connections in a row: passed over until its health check passes",
                       replica.instance_id, replica.failures)
    if replica.skipped_at:
        _watch_health(replica)


def note_success(replica: Replica) -> None:
    """A connection to it worked (a passed-over one tried as the last resort stays passed over: only its health
    check lets it back)."""
    if replica.failures and not replica.skipped_at:
        replica.failures = 0


def _watch_health(replica: Replica) -> None:
    """Start asking a passed-over replica's health check, unless that is under way on this loop."""
    task = replica.health_check
    loop = asyncio.get_running_loop()
    if task is not None and not task.done() and task.get_loop() is loop:
        return
    replica.health_check = task = loop.create_task(_until_healthy(replica))
    _health_checks.add(task)
    task.add_done_callback(_health_checks.discard)


async def _until_healthy(replica: Replica) -> None:
    """Ask the health check every HEALTH_CHECK_EVERY seconds; let the replica back once it answers 200. Ends then,
    or once the replica has left the tables (stopped, moved, its model deleted)."""
    path = health_path(replica.backend)
    while True:
        await asyncio.sleep(HEALTH_CHECK_EVERY)
        if not replica.skipped_at or not _listed(replica):
            return
        if await answers_health_check(replica.host, replica.port, path, replica.head, HEALTH_CHECK_TIMEOUT):
            if replica.skipped_at and _listed(replica):
                replica.failures, replica.skipped_at = 0, 0.0
                logger.warning("instance %s passes its health check again: back in the balancing",
                               replica.instance_id)
            return


def health_path(backend: str) -> str:
    """The path of a backend's health check, as the workers and the server's own probes ask it."""
    from workers_app.backends import BackendError, get_backend

    try:
        return get_backend(backend or "llama-box").health_path
    except BackendError:
        return "/health"


def _listed(replica: Replica) -> bool:
    snapshot = TABLES.snapshot
    return snapshot is not None and any(replica in route.replicas for route in snapshot.routes.values())


def stop_health_checks() -> None:
    """At shutdown: end the health checks running on this loop."""
    loop = asyncio.get_running_loop()
    for task in list(_health_checks):
        if task.get_loop() is loop:
            task.cancel()
