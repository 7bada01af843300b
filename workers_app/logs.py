"""Instance logs: the worker ships its backends' log lines into a capped Redis Stream per instance, so any
node can serve the tail and follow it live; the files on the worker are size-capped and rotated.

Each start of a backend is an attempt with a log of its own, kept beside the live one: a restart never overwrites
the lines that said why the previous run died. The last AIMIND_INSTANCE_LOG_ATTEMPTS attempts are kept, as files on
the worker (`7.log` the current, `7.attempt-3.log` an earlier one, `7.attempts.json` their index) and as one capped
stream each in Redis (with an index hash: number, start, end, exit code), from which any server reads them."""

from __future__ import annotations

import json
import logging
import os
from datetime import UTC, datetime
from pathlib import Path

import redis
from django.conf import settings

logger = logging.getLogger(__name__)

STREAM_MAX_LINES = 5000  # per instance, kept in Redis across restarts (the previous run's tail stays visible)
STREAM_TTL_SECONDS = 7 * 24 * 3600
FILE_MAX_BYTES = 8 * 1024 * 1024
FILE_TAIL_BYTES = 4 * 1024 * 1024  # read from a file's end without Redis
READ_CHUNK = 256 * 1024


def stream_key(instance_id: int) -> str:
    return f"aimind:logs:{instance_id}"


def attempts_key(instance_id: int) -> str:
    """A hash: each kept attempt's number → its JSON record, and `last` → the last number given."""
    return f"aimind:logs:{instance_id}:attempts"


def attempt_key(instance_id: int, attempt: int) -> str:
    return f"aimind:logs:{instance_id}:attempt:{attempt}"


def log_path(instance_id: int, data_dir: Path | None = None) -> Path:
    """The current attempt's log file on the worker whose data dir this is (the server's own without Redis)."""
    return (data_dir or settings.DATA_DIR) / "logs" / "instances" / f"{instance_id}.log"


def attempt_path(path: Path, attempt: int) -> Path:
    """Where an earlier attempt's log is kept beside the current one: 7.log → 7.attempt-3.log."""
    return path.with_name(f"{path.stem}.attempt-{attempt}.log")


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
        lines = tail_lines(log_path(instance_id), n=n, max_bytes=FILE_TAIL_BYTES, current_run_only=False)
    return lines


def forget(instance_ids: list[int]) -> None:
    conn = client()
    if conn is None or not instance_ids:
        return
    with conn:
        keys = []
        for i in instance_ids:
            keys += [stream_key(i), attempts_key(i)]
            keys += [attempt_key(i, int(field)) for field in conn.hkeys(attempts_key(i)) if field.isdigit()]
        conn.delete(*keys)


# Attempts: the worker begins and ends them; any server lists and reads them.

def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _index_path(path: Path) -> Path:
    return path.with_name(f"{path.stem}.attempts.json")


def _read_index(path: Path) -> list[dict]:
    try:
        entries = json.loads(_index_path(path).read_text())
    except (OSError, ValueError):
        return []
    return [e for e in entries if _is_record(e)] if isinstance(entries, list) else []


def _is_record(entry) -> bool:
    return isinstance(entry, dict) and isinstance(entry.get("attempt"), int)


def _write_index(path: Path, entries: list[dict]) -> None:
    target = _index_path(path)
    tmp = target.with_suffix(".tmp")
    tmp.write_text(json.dumps(entries))
    tmp.replace(target)


def begin_attempt(instance_id: int, path: Path, conn: redis.Redis | None = None, keep: int | None = None) -> int:
    """A backend of the instance is about to start, logging to `path`: the previous attempt's file is kept under its
    number, attempts beyond the last `keep` go (files and streams), and the new one is recorded. Returns its number,
    counted in Redis when there is one (so it keeps rising when the instance moves to another worker)."""
    keep = keep or settings.INSTANCE_LOG_ATTEMPTS
    entries = _read_index(path)
    previous = entries[-1]["attempt"] if entries else 0  # 0: a log from before attempts were counted
    number = previous + 1
    if conn is not None:
        try:
            number = max(number, conn.hincrby(attempts_key(instance_id), "last", 1))
        except redis.RedisError as exc:  # the backend starts all the same; its attempt is counted here only
            logger.warning("instance %s: could not count its attempt in Redis: %s", instance_id, exc)
            conn = None
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and path.stat().st_size:
        path.replace(attempt_path(path, previous))
    path.with_name(path.name + ".1").unlink(missing_ok=True)  # the size-rotated start of the previous attempt
    oldest = number - keep + 1
    for old in path.parent.glob(f"{path.stem}.attempt-*.log"):
        kept_number = old.name[len(path.stem) + len(".attempt-"):-len(".log")]
        if not kept_number.isdigit() or int(kept_number) < oldest:
            old.unlink(missing_ok=True)
    record = {"attempt": number, "started_at": _now(), "ended_at": None, "exit_code": None, "exit": ""}
    _write_index(path, [e for e in entries if e["attempt"] >= oldest] + [record])
    if conn is not None:
        try:
            _record_in_redis(conn, instance_id, record, oldest)
        except redis.RedisError as exc:
            logger.warning("instance %s: could not record attempt %s in Redis: %s", instance_id, number, exc)
    return number


def _record_in_redis(conn: redis.Redis, instance_id: int, record: dict, oldest: int) -> None:
    key = attempts_key(instance_id)
    dropped = [int(f) for f in conn.hkeys(key) if f.isdigit() and int(f) < oldest]
    with conn.pipeline(transaction=False) as pipe:
        pipe.hset(key, mapping={"last": record["attempt"], str(record["attempt"]): json.dumps(record)})
        if dropped:
            pipe.hdel(key, *map(str, dropped))
            pipe.delete(*[attempt_key(instance_id, n) for n in dropped])
        pipe.expire(key, STREAM_TTL_SECONDS)
        pipe.execute()


def end_attempt(instance_id: int, path: Path, attempt: int, exit_code: int | None, how: str,
                conn: redis.Redis | None = None) -> None:
    """The attempt's backend ended: when, its exit code (None when not known: an adopted process, a stop) and how
    ("exited with code 1", "killed by signal SIGKILL", "stopped")."""
    if not attempt:
        return
    ended = {"ended_at": _now(), "exit_code": exit_code, "exit": how}
    entries = _read_index(path)
    for entry in entries:
        if entry["attempt"] == attempt:
            entry.update(ended)
    try:
        if entries:
            _write_index(path, entries)
    except OSError as exc:  # how it ended is a record; the failure report that follows matters more
        logger.warning("instance %s: could not record how attempt %s ended: %s", instance_id, attempt, exc)
    if conn is not None:
        try:
            raw = conn.hget(attempts_key(instance_id), str(attempt))
            if raw:
                conn.hset(attempts_key(instance_id), str(attempt), json.dumps({**json.loads(raw), **ended}))
        except (redis.RedisError, ValueError) as exc:
            logger.warning("instance %s: could not record how attempt %s ended: %s", instance_id, attempt, exc)


def attempts(instance_id: int) -> list[dict]:
    """The instance's kept attempts, newest first: `attempt`, `started_at`, `ended_at`, `exit_code`, `exit`, and
    `current` (the newest)."""
    conn = client()
    if conn is None:
        entries = _read_index(log_path(instance_id))
    else:
        with conn:
            found = conn.hgetall(attempts_key(instance_id))
        entries = []
        for field, value in found.items():
            try:
                entries += [json.loads(value)] if field.isdigit() else []
            except ValueError:
                continue
        entries = [e for e in entries if _is_record(e)]
    entries.sort(key=lambda e: -e["attempt"])
    return [{**e, "current": n == 0} for n, e in enumerate(entries)]


def attempt_lines(instance_id: int, attempt: int, n: int) -> list[str] | None:
    """The last `n` lines of one kept attempt, oldest first; None when that attempt is not kept."""
    kept = [e["attempt"] for e in attempts(instance_id)]
    if attempt not in kept:
        return None
    conn = client()
    if conn is None:
        from workers_app.processes import tail_lines

        path = log_path(instance_id)
        source = path if attempt == kept[0] else attempt_path(path, attempt)
        return tail_lines(source, n=n, max_bytes=FILE_TAIL_BYTES, current_run_only=False)
    with conn:
        entries = conn.xrevrange(attempt_key(instance_id, attempt), count=n)
    return [fields.get("line", "") for _, fields in reversed(entries)]


class LogShipper:
    """Follows log files from a byte offset and appends complete lines to the instance's stream."""

    def __init__(self, conn: redis.Redis):
        self.conn = conn
        self.offsets: dict[int, int] = {}
        self.partial: dict[int, bytes] = {}
        self.attempts: dict[int, int] = {}  # the attempt each instance's file belongs to: its lines go there too

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
            attempt = self.attempts.get(instance_id)
            keys = [stream_key(instance_id)] + ([attempt_key(instance_id, attempt)] if attempt else [])
            with self.conn.pipeline(transaction=False) as pipe:
                for key in keys:
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

    def start_at_end(self, instance_id: int, path: Path, attempt: int | None = None) -> None:
        """A new run appends to the file: ship from here, not what earlier runs already shipped. `attempt`: the
        attempt whose stream gets these lines too."""
        self.offsets[instance_id] = path.stat().st_size if path.exists() else 0
        self.partial.pop(instance_id, None)
        if attempt:
            self.attempts[instance_id] = attempt
        else:
            self.attempts.pop(instance_id, None)

    def forget(self, instance_id: int) -> None:
        self.offsets.pop(instance_id, None)
        self.partial.pop(instance_id, None)
        self.attempts.pop(instance_id, None)
