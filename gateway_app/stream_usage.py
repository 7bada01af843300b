"""Exact token counts for streamed chat completions: the gateway asks the backend for the stream's usage
(`stream_options.include_usage`, which llama-server and vLLM honour) even when the client did not, counts it, and
keeps that usage-only event from a client that did not ask for it."""

from __future__ import annotations

import json

INCLUDE_USAGE = b'"stream_options":{"include_usage":true},'


def ask_for_usage(fields: dict, body: bytes) -> tuple[bytes, UsageFilter | None]:
    """The body to send for a streamed chat completion, and the filter its answer goes through (None: the client
    asked for the usage itself, and gets it)."""
    options = fields.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage") is True:
        return body, None
    if options is None and "stream_options" not in fields:
        start = body.index(b"{") + 1  # a JSON object with fields (it has `model`): one more goes first
        return body[:start] + INCLUDE_USAGE + body[start:], UsageFilter()
    asked = {**fields, "stream_options": {**(options if isinstance(options, dict) else {}), "include_usage": True}}
    return json.dumps(asked).encode(), UsageFilter()


class UsageFilter:
    """Passes a server-sent event stream on, whole events at a time, less the usage-only event (`choices` empty,
    `usage` set) that OpenAI's stream ends with when asked."""

    def __init__(self) -> None:
        self.pending = b""  # the start of an event whose end has not come yet

    def feed(self, chunk: bytes) -> bytes:
        data = self.pending + chunk if self.pending else chunk
        lf, crlf = data.rfind(b"\n\n"), data.rfind(b"\r\n\r\n")
        end = max(lf + 2 if lf >= 0 else 0, crlf + 4 if crlf >= 0 else 0)
        ready, self.pending = data[:end], data[end:]
        if b'"usage"' not in ready:
            return ready
        return b"".join(event for event in _events(ready) if not _usage_only(event))

    def rest(self) -> bytes:
        rest, self.pending = self.pending, b""
        return b"" if _usage_only(rest) else rest


def _events(data: bytes) -> list[bytes]:
    events, start = [], 0
    while start < len(data):
        lf, crlf = data.find(b"\n\n", start), data.find(b"\r\n\r\n", start)
        ends = [at + size for at, size in ((lf, 2), (crlf, 4)) if at >= 0]
        end = min(ends) if ends else len(data)
        events.append(data[start:end])
        start = end
    return events


def _usage_only(event: bytes) -> bool:
    if b'"usage"' not in event:
        return False
    lines = [line[5:] for line in event.splitlines() if line.startswith(b"data:")]
    try:
        payload = json.loads(b"\n".join(lines)) if lines else None
    except (ValueError, UnicodeDecodeError):
        return False
    return isinstance(payload, dict) and payload.get("choices") == [] and isinstance(payload.get("usage"), dict)
