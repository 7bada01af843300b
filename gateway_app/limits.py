"""Quotas and rate limits, checked by the gateway before it forwards a request: per API key the models it may call,
requests and tokens per minute, tokens per day (UTC); per model, requests per minute over all keys. The counts live
in Redis, so every web process shares them: one script call per limited request (atomic, on Redis's clock); a
request's tokens are added after its answer. Limits come from the in-memory tables (gateway_app.tables), never
from the database. With Redis unreachable, requests are admitted: serving beats limiting.

Per-minute limits are token buckets (GCRA, as OpenAI's own limits): a key allowed 60 requests a minute may send 60 at
once, then one a second; a token budget admits while the tokens used in the last minute (or today) are under it."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass

import redis.asyncio
from django.conf import settings

from gateway_app.tables import Key, Route

logger = logging.getLogger(__name__)
REDIS_RETRY_AFTER = 1.0  # seconds without asking Redis again after it failed to answer
PREFIX = "aimind:limit"

# KEYS: one state key per limit; ARGV: (kind, limit) per key. Kinds: "r" requests per minute (the request takes one
# from the bucket), "t" tokens per minute (only checked here; added after the answer), "d" tokens per day (a counter
# per UTC day, checked only). Returns {0, 0} when admitted (and only then takes the requests), else {the refusing
# limit's position, milliseconds until it would admit}.
ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local day = math.floor(tonumber(t[1]) / 86400)
local taken = {}
for i, key in ipairs(KEYS) do
  local kind, limit = ARGV[2 * i - 1], tonumber(ARGV[2 * i])
  if kind == 'd' then
    if tonumber(redis.call('GET', key .. ':' .. day) or '0') >= limit then
      return {i, (day + 1) * 86400000 - now}
    end
  else
    local tat = math.max(tonumber(redis.call('GET', key) or '0'), now)
    if kind == 'r' then
      tat = tat + 60000 / limit
      if tat - now > 60000 then return {i, tat - 60000 - now} end
      taken[#taken + 1] = {key, tat}
    elseif tat - now >= 60000 then
      return {i, tat - 60000 - now}
    end
  end
end
for _, entry in ipairs(taken) do
  redis.call('SET', entry[1], string.format('%.3f', entry[2]), 'PX', math.ceil(entry[2] - now) + 1000)
end
return {0, 0}
"""

# KEYS and ARGV as ADMIT's, for the token limits only; ARGV's last item: the answer's tokens.
ADD_TOKENS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local day = math.floor(tonumber(t[1]) / 86400)
local tokens = tonumber(ARGV[#ARGV])
for i, key in ipairs(KEYS) do
  local kind, limit = ARGV[2 * i - 1], tonumber(ARGV[2 * i])
  if kind == 'd' then
    redis.call('INCRBY', key .. ':' .. day, tokens)
    redis.call('EXPIRE', key .. ':' .. day, 172800)
  else
    local tat = math.max(tonumber(redis.call('GET', key) or '0'), now) + tokens * 60000 / limit
    redis.call('SET', key, string.format('%.3f', tat), 'PX', math.ceil(tat - now) + 1000)
  end
end
return 0
"""


@dataclass(frozen=True, slots=True)
class Refusal:
    """What the client is answered instead (OpenAI's error shape, or the route's own)."""

    status: int
    message: str
    type: str
    code: str
    headers: tuple[tuple[bytes, bytes], ...] = ()


def not_allowed(key: Key, model_name: str) -> Refusal | None:
    """403 when the key may call only other models (checked before the model is looked up: a key learns nothing of
    the models it may not call)."""
    if key.allowed_models is None or model_name in key.allowed_models:
        return None
    return Refusal(403, f"API key '{key.name}' may not call the model '{model_name}'.", "invalid_request_error",
                   "model_not_allowed")


def _limits(key: Key, target: Route) -> list[tuple[str, str, int, str]]:
    """(Redis key, kind, limit, what the client is told) for each limit this request is under."""
    limits = []
    if key.requests_per_minute is not None:
        limits.append((f"{PREFIX}:key:{key.id}:rpm", "r", key.requests_per_minute,
                       f"API key '{key.name}' is limited to {key.requests_per_minute} requests per minute."))
    if target.requests_per_minute is not None:
        limits.append((f"{PREFIX}:model:{target.model_id}:rpm", "r", target.requests_per_minute,
                       f"The model '{target.name}' is limited to {target.requests_per_minute} requests per minute."))
    return limits + _token_limits(key)


def _token_limits(key: Key) -> list[tuple[str, str, int, str]]:
    limits = []
    if key.tokens_per_minute is not None:
        limits.append((f"{PREFIX}:key:{key.id}:tpm", "t", key.tokens_per_minute,
                       f"API key '{key.name}' is limited to {key.tokens_per_minute} tokens per minute."))
    if key.tokens_per_day is not None:
        limits.append((f"{PREFIX}:key:{key.id}:tpd", "d", key.tokens_per_day,
                       f"API key '{key.name}' is limited to {key.tokens_per_day} tokens per day (UTC)."))
    return limits


class Limiter:
    """One process's way to the shared counts: a Redis client per event loop and its scripts."""

    def __init__(self) -> None:
        self._clients: dict[int, tuple[asyncio.AbstractEventLoop, str, redis.asyncio.Redis, tuple]] = {}
        self._failed_at = -1e9
        self._warned = False

    def _scripts(self):
        url = settings.REDIS_URL
        if not url or time.monotonic() - self._failed_at < REDIS_RETRY_AFTER:
            return None
        loop = asyncio.get_running_loop()
        entry = self._clients.get(id(loop))
        if entry is None or entry[0] is not loop or entry[1] != url:
            self._clients = {k: v for k, v in self._clients.items() if not v[0].is_closed()}
            client = redis.asyncio.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)
            entry = self._clients[id(loop)] = (loop, url, client, (client.register_script(ADMIT),
                                                                   client.register_script(ADD_TOKENS)))
        return entry[3]

    def _failed(self, exc: Exception) -> None:
        self._failed_at = time.monotonic()
        if not self._warned:
            self._warned = True
            logger.warning("the gateway cannot reach Redis to count rate limits (%s); admitting every request "
                           "until it answers again", exc)

    def _answered(self) -> None:
        if self._warned:
            self._warned = False
            logger.info("the gateway counts rate limits in Redis again")

    async def admit(self, key: Key, target: Route) -> Refusal | None:
        """None when every limit admits the request (and then it is counted), else the 429 to answer."""
        limits = _limits(key, target)
        if not limits:
            return None
        scripts = self._scripts()
        if scripts is None:
            return None
        args = [a for _, kind, limit, _ in limits for a in (kind, limit)]
        try:
            refused, wait_ms = await scripts[0](keys=[name for name, *_ in limits], args=args)
        except (redis.RedisError, OSError) as exc:
            self._failed(exc)
            return None
        self._answered()
        if not refused:
            return None
        _, kind, _, message = limits[refused - 1]
        retry_after = max(1, math.ceil(wait_ms / 1000))
        return Refusal(429, f"{message} Try again in {retry_after} s.", "tokens" if kind in "td" else "requests",
                       "rate_limit_exceeded", ((b"retry-after", str(retry_after).encode()),))

    async def add_tokens(self, key: Key, tokens: int) -> None:
        """Count an answer's tokens against the key's token limits (after the answer: its size is known only then)."""
        limits = _token_limits(key) if tokens > 0 else []
        scripts = self._scripts() if limits else None
        if scripts is None:
            return
        args = [a for _, kind, limit, _ in limits for a in (kind, limit)]
        try:
            await scripts[1](keys=[name for name, *_ in limits], args=[*args, tokens])
        except (redis.RedisError, OSError) as exc:
            self._failed(exc)


LIMITER = Limiter()

