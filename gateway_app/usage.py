"""Who used what: each answer's prompt and completion tokens (the backend's `usage`, or llama.cpp's `timings`) and
each key's last use, counted in memory and written in batches, off the request path."""

from __future__ import annotations

import json
import logging
import time
from datetime import UTC, date, datetime

from django.db import IntegrityError, transaction
from django.db.models import F, Q

logger = logging.getLogger(__name__)
_decoder = json.JSONDecoder()


def tokens_in(tail: bytes) -> tuple[int, int]:
    """(prompt, completion) tokens from the end of an answer (a JSON body, or a stream's last events): the last
    `usage` object, else the last llama.cpp `timings`; (0, 0) when there is neither."""
    for name, prompt, completion in ((b'"usage"', "prompt_tokens", "completion_tokens"),
                                     (b'"timings"', "prompt_n", "predicted_n")):
        at = tail.rfind(name)
        if at < 0:
            continue
        brace = tail.find(b"{", at + len(name))
        if brace < 0:
            continue
        try:
            found, _ = _decoder.raw_decode(tail[brace:].decode("utf-8", "replace"))
        except ValueError:
            continue
        if isinstance(found, dict):
            return _count(found.get(prompt)), _count(found.get(completion))
    return 0, 0


def _count(value) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


class Meter:
    """Counts of one process since its last flush."""

    def __init__(self) -> None:
        self.counts: dict[tuple[date, int, str], list[int]] = {}
        self.last_used: dict[int, float] = {}
        # For /metrics: (model, status class) → [requests, latency sum, count per latency bucket…].
        self.served: dict[tuple[str, str], list] = {}
        # For the dashboard: (minute, key id, model) → [requests, errors, prompt, completion, latency sum, buckets…].
        self.minutes: dict[tuple[datetime, int | None, str], list] = {}
        # Each model's last request (epoch seconds): how long it has been idle (gateway_app.waking writes it).
        self.requested: dict[str, float] = {}
        self.flushed_at = time.monotonic()

    def _minute(self, key_id: int | None, model_name: str) -> list:
        from aimind.metrics import LATENCY_BUCKETS

        bucket = (datetime.now(UTC).replace(second=0, microsecond=0), key_id, model_name)
        entry = self.minutes.get(bucket)
        if entry is None:
            entry = self.minutes[bucket] = [0, 0, 0, 0, 0.0] + [0] * (len(LATENCY_BUCKETS) + 1)
        return entry

    def note_served(self, model_name: str, status: int, seconds: float, key_id: int | None = None) -> None:
        """One request for a model answered (`status` 0: the client left first), and how long it took."""
        from aimind.metrics import LATENCY_BUCKETS, bucket_of

        self.requested[model_name] = time.time()
        key = (model_name, f"{status // 100}xx" if status else "client_left")
        entry = self.served.get(key)
        if entry is None:
            entry = self.served[key] = [0, 0.0] + [0] * (len(LATENCY_BUCKETS) + 1)
        index = bucket_of(seconds)
        entry[0] += 1
        entry[1] += seconds
        entry[2 + index] += 1
        minute = self._minute(key_id, model_name)
        minute[0] += 1
        minute[1] += not 200 <= status < 300
        minute[4] += seconds
        minute[5 + index] += 1

    def take_requested(self) -> dict[str, float]:
        requested, self.requested = self.requested, {}
        return requested

    def put_back_requested(self, requested: dict[str, float]) -> None:
        for name, when in requested.items():
            self.requested[name] = max(when, self.requested.get(name, 0.0))

    def take_served(self) -> dict[tuple[str, str], list]:
        served, self.served = self.served, {}
        return served

    def note_use(self, key_id: int) -> None:
        self.last_used[key_id] = time.time()

    def note_answer(self, key_id: int, model_name: str, prompt: int, completion: int) -> None:
        minute = self._minute(key_id, model_name)
        minute[2] += prompt
        minute[3] += completion
        bucket = (datetime.now(UTC).date(), key_id, model_name)
        counts = self.counts.get(bucket)
        if counts is None:
            self.counts[bucket] = [1, prompt, completion]
        else:
            counts[0] += 1
            counts[1] += prompt
            counts[2] += completion

    def take(self) -> tuple[dict, dict, dict]:
        counts, last_used, minutes = self.counts, self.last_used, self.minutes
        self.counts, self.last_used, self.minutes = {}, {}, {}
        self.flushed_at = time.monotonic()
        return counts, last_used, minutes

    def put_back(self, counts: dict, last_used: dict, minutes: dict | None = None) -> None:
        """A flush failed: its counts join the next one (a last-used mark newer than the lost one wins)."""
        for bucket, values in (minutes or {}).items():
            mine = self.minutes.get(bucket)
            if mine is None:
                self.minutes[bucket] = list(values)
            else:
                for index, value in enumerate(values):
                    mine[index] += value
        for bucket, (requests, prompt, completion) in counts.items():
            mine = self.counts.setdefault(bucket, [0, 0, 0])
            mine[0] += requests
            mine[1] += prompt
            mine[2] += completion
        for key_id, when in last_used.items():
            self.last_used[key_id] = max(when, self.last_used.get(key_id, 0.0))


def write(counts: dict, last_used: dict, minutes: dict | None = None) -> None:
    """Add a batch to the database (sync; web processes call it in a thread). Several processes may add to the same
    row at once: increments, and a row created by whoever comes first."""
    with transaction.atomic():  # all or nothing: a batch put back after a failure is never counted twice
        _write(counts, last_used, minutes or {})


def _write(counts: dict, last_used: dict, minutes: dict) -> None:
    from gateway_app.models import ApiKey, Usage

    for (minute, key_id, model_name), values in minutes.items():
        _add_minute(minute, key_id, model_name, values)

    for key_id, when in last_used.items():  # only forward: another process may have written a later use first
        moment = datetime.fromtimestamp(when, UTC)
        ApiKey.objects.filter(Q(last_used_at__isnull=True) | Q(last_used_at__lt=moment), pk=key_id).update(
            last_used_at=moment)
    for (day, key_id, model_name), (requests, prompt, completion) in counts.items():
        increments = {"requests": F("requests") + requests, "prompt_tokens": F("prompt_tokens") + prompt,
                      "completion_tokens": F("completion_tokens") + completion}
        row = Usage.objects.filter(day=day, api_key_id=key_id, model_name=model_name)
        if row.update(**increments):
            continue
        try:
            with transaction.atomic():
                Usage.objects.create(day=day, api_key_id=key_id, model_name=model_name, requests=requests,
                                     prompt_tokens=prompt, completion_tokens=completion)
        except IntegrityError:  # another process created it meanwhile (or the key is gone: then nothing to add to)
            row.update(**increments)


METER = Meter()


def _add_minute(minute: datetime, key_id: int | None, model_name: str, values: list) -> None:
    from gateway_app.models import UsageMinute

    requests, errors, prompt, completion, seconds, *buckets = values
    row = UsageMinute.objects.filter(minute=minute, api_key_id=key_id, model_name=model_name)
    increments = {"requests": F("requests") + requests, "errors": F("errors") + errors,
                  "prompt_tokens": F("prompt_tokens") + prompt,
                  "completion_tokens": F("completion_tokens") + completion,
                  "latency_seconds": F("latency_seconds") + seconds}
    for _ in range(2):
        with transaction.atomic():
            found = row.select_for_update().values_list("latency_buckets", flat=True).first()
            if found is not None:  # the histogram is a list: read, add, write, under the row's lock
                merged = [a + b for a, b in zip(padded(found, len(buckets)), buckets, strict=True)]
                row.update(latency_buckets=merged, **increments)
                return
        try:
            with transaction.atomic():
                UsageMinute.objects.create(minute=minute, api_key_id=key_id, model_name=model_name,
                                           requests=requests, errors=errors, prompt_tokens=prompt,
                                           completion_tokens=completion, latency_seconds=seconds,
                                           latency_buckets=list(buckets))
                return
        except IntegrityError:  # another process made it meanwhile (or the key is gone): add to it next round
            continue


def padded(values: list | None, size: int) -> list[int]:
    """A stored latency histogram as `size` integer counts (a shorter one, from fewer buckets, padded with zeros)."""
    values = values or []
    return [int(v) for v in values[:size]] + [0] * max(0, size - len(values))
