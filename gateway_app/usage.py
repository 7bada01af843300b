"""Who used what: each answer's prompt and completion tokens (the backend's `usage`, or llama.cpp's `timings`) and
each key's last use, counted in memory and written in batches, off the request path."""

from __future__ import annotations

import json
import logging
import time
from datetime import UTC, date, datetime

from django.db import IntegrityError, transaction
from django.db.models import F

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
        self.flushed_at = time.monotonic()

    def note_use(self, key_id: int) -> None:
        self.last_used[key_id] = time.time()

    def note_answer(self, key_id: int, model_name: str, prompt: int, completion: int) -> None:
        bucket = (datetime.now(UTC).date(), key_id, model_name)
        counts = self.counts.get(bucket)
        if counts is None:
            self.counts[bucket] = [1, prompt, completion]
        else:
            counts[0] += 1
            counts[1] += prompt
            counts[2] += completion

    def take(self) -> tuple[dict, dict]:
        counts, last_used = self.counts, self.last_used
        self.counts, self.last_used = {}, {}
        self.flushed_at = time.monotonic()
        return counts, last_used

    def put_back(self, counts: dict, last_used: dict) -> None:
        """A flush failed: its counts join the next one (a last-used mark newer than the lost one wins)."""
        for bucket, (requests, prompt, completion) in counts.items():
            mine = self.counts.setdefault(bucket, [0, 0, 0])
            mine[0] += requests
            mine[1] += prompt
            mine[2] += completion
        for key_id, when in last_used.items():
            self.last_used[key_id] = max(when, self.last_used.get(key_id, 0.0))


def write(counts: dict, last_used: dict) -> None:
    """Add a batch to the database (sync; web processes call it in a thread). Several processes may add to the same
    row at once: increments, and a row created by whoever comes first."""
    from gateway_app.models import ApiKey, Usage

    for key_id, when in last_used.items():
        ApiKey.objects.filter(pk=key_id).update(last_used_at=datetime.fromtimestamp(when, UTC))
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
