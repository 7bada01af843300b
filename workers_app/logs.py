"""Instance logs: the worker ships its backends' log lines into a capped Redis Stream per instance, so any
node can serve the tail and follow it live; the files on the worker are size-capped and rotated."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import redis
from django.conf import settings

logger = logging.getLogger(__name__)

STREAM_MAX_LINES = 5000  # per instance, kept in Redis across restarts (the previous run's tail stays visible)
STREAM_TTL_SECONDS = 7 * 24 * 3600
FILE_MAX_BYTES = 8 * 1024 * 1024
READ_CHUNK = 256 * 1024


def stream_key(instance_id: int) -> str:
    return f"aimind:logs:{instance_id}"


def client() -> redis.Redis | None:
    if not settings.REDIS_URL:
        return None
    return redis.Redis.from_url(settings.REDIS_URL, decode_responses=True)


def tail(instance_id: int, n: int) -> list[str] | None:
    """The last `n` lines, oldest first; None when no Redis is configured."""
    conn = client()
    if conn is None:
        return None
    with conn:
        entries = conn.xrevrange(stream_key(instance_id), count=n)
    return [fields.get("line", "") for _, fields in reversed(entries)]


def last_lines(instance_id: int, n: int) -> list[str]:
    """The last `n` lines from the instance's stream, or without Redis (one process) from the file on this machine."""
    from workers_app.processes import tail_lines

    lines = tail(instance_id, n)
    if lines is None:
        path = settings.DATA_DIR / "logs" / "instances" / f"{instance_id}.log"
        lines = tail_lines(path, n=n, max_bytes=4 * 1024 * 1024, current_run_only=False)
    return lines


def forget(instance_ids: list[int]) -> None:
    conn = client()
    if conn is None or not instance_ids:
        return
    with conn:
        conn.delete(*[stream_key(i) for i in instance_ids])


class LogShipper:
    """Follows log files from a byte offset and appends complete lines to the instance's stream."""

    def __init__(self, conn: redis.Redis):
        self.conn = conn
        self.offsets: dict[int, int] = {}
        self.partial: dict[int, bytes] = {}

    def ship(self, instance_id: int, path: Path) -> int:
        offset = self.offsets.get(instance_id, 0)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return 0
        if size < offset:  # truncated by rotation: from its start
            offset = 0
        lines: list[str] = []
        with open(path, "rb") as f:
            f.seek(offset)
            while True:
                chunk = f.read(READ_CHUNK)
                if not chunk:
                    break
                data = self.partial.pop(instance_id, b"") + chunk
                *complete, rest = data.split(b"\n")
                if rest:
                    self.partial[instance_id] = rest
                lines += [line.decode("utf-8", "replace").rstrip("\r") for line in complete]
            offset = f.tell()
        self.offsets[instance_id] = offset
        if lines:
            key = stream_key(instance_id)
            with self.conn.pipeline(transaction=False) as pipe:
                for line in lines:
                    pipe.xadd(key, {"line": line}, maxlen=STREAM_MAX_LINES, approximate=True)
                pipe.expire(key, STREAM_TTL_SECONDS)
                pipe.execute()
        if offset > FILE_MAX_BYTES:
            self._rotate(instance_id, path)
        return len(lines)

    def _rotate(self, instance_id: int, path: Path) -> None:
        """Keep one previous file and start the live one over (the backend appends, so it follows)."""
        rotated = path.with_suffix(path.suffix + ".1")
        with open(path, "rb") as src, open(rotated, "wb") as dst:
            while chunk := src.read(READ_CHUNK):
                dst.write(chunk)
        os.truncate(path, 0)
        self.offsets[instance_id] = 0

    def start_at_end(self, instance_id: int, path: Path) -> None:
        """A new run appends to the file: ship from here, not what earlier runs already shipped."""
        self.offsets[instance_id] = path.stat().st_size if path.exists() else 0
        self.partial.pop(instance_id, None)

    def forget(self, instance_id: int) -> None:
        self.offsets.pop(instance_id, None)
        self.partial.pop(instance_id, None)
