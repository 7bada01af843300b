"""Which running replica serves a request: the one with the fewest requests in flight (ties in turn), passing over
a replica whose connections keep failing until its cooldown ends (then one request tries it again)."""

from __future__ import annotations

import time

from django.conf import settings

from gateway_app.tables import Replica, Route


def pick(route: Route, tried: set[int] = frozenset()) -> Replica | None:
    """The least busy replica not yet tried; a failing one only when every other is failing or tried too."""
    now = time.monotonic()
    best: list[Replica] = []
    best_load = None
    fallback: list[Replica] = []
    for replica in route.replicas:
        if replica.instance_id in tried:
            continue
        if replica.skip_until > now:
            fallback.append(replica)
            continue
        if best_load is None or replica.outstanding < best_load:
            best, best_load = [replica], replica.outstanding
        elif replica.outstanding == best_load:
            best.append(replica)
    if not best:
        if not fallback:
            return None
        best = [min(fallback, key=lambda r: r.skip_until)]  # the one whose cooldown ends first
    if len(best) == 1:
        return best[0]
    route.turn += 1
    return best[route.turn % len(best)]


def note_failure(replica: Replica) -> None:
    """A connection to it failed: after GATEWAY_REPLICA_FAILURES in a row it is skipped for the cooldown."""
    replica.failures += 1
    if replica.failures >= settings.GATEWAY_REPLICA_FAILURES:
        replica.skip_until = time.monotonic() + settings.GATEWAY_REPLICA_COOLDOWN


def note_success(replica: Replica) -> None:
    if replica.failures:
        replica.failures = 0
        replica.skip_until = 0.0
