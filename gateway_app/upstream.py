"""A small HTTP/1.1 client for the backends: a pool of keep-alive connections per backend address (and event loop),
answers parsed by httptools (uvicorn's parser), bodies handed over as they arrive. General clients cost more per
request than the whole hop should."""

from __future__ import annotations

import asyncio
import time
from collections import deque

import httptools

CONNECT_TIMEOUT = 5.0
READ_TIMEOUT = 600.0  # the longest silence from a backend inside one answer (a long prompt before its first token)
HIGH_WATER, LOW_WATER = 1 << 20, 1 << 18  # bytes of a body held for a slow client before the backend is paused
MAX_IDLE = 64  # keep-alive connections kept per backend
# An idle connection holds one of llama-server's HTTP threads (n_parallel + 2 of them) until it closes: let go soon.
IDLE_TIMEOUT = 0.5


class ConnectFailed(Exception):
    """No connection to the backend: nothing was sent, so another replica may take the request."""


class UpstreamBroken(Exception):
    """The backend closed or garbled the connection after the request was sent."""


class _Stale(Exception):
    """A reused keep-alive connection was closed before any answer: the request goes on a new connection."""


class Exchange:
    """One request and its answer: `status` and `headers` (lower-case names) once sent; `read()` gives the body."""

    __slots__ = ("status", "headers", "head", "chunks", "buffered", "done", "error", "waiter", "conn", "started",
                 "timer")

    def __init__(self, conn: _Connection) -> None:
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.head = conn.loop.create_future()
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.done = False
        self.error: Exception | None = None
        self.waiter: asyncio.Future | None = None
        self.conn = conn
        self.started = False  # a byte of the answer arrived
        self.timer: asyncio.TimerHandle | None = None

    async def read(self) -> bytes:
        """The next piece of the body; b"" at its end."""
        while True:
            if self.chunks:
                data = self.chunks.popleft() if len(self.chunks) == 1 else b"".join(self.chunks)
                self.chunks.clear()
                self.buffered = 0
                self.conn.resume_for(self)
                return data
            if self.error is not None:
                raise self.error
            if self.done:
                return b""
            self.waiter = self.conn.loop.create_future()
            await self.waiter

    async def body(self) -> bytes:
        parts = []
        while piece := await self.read():
            parts.append(piece)
        return b"".join(parts)

    def abort(self) -> None:
        """Stop now: the connection is closed, which is how a backend learns that nobody wants the rest."""
        if not self.done:
            self.conn.transport.abort()

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def _feed(self, data: bytes) -> None:
        self.chunks.append(data)
        self.buffered += len(data)
        if self.buffered > HIGH_WATER:
            self.conn.pause()
        self._wake()

    def _finish(self, error: Exception | None = None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        if self.done or self.error is not None:
            return
        if error is None:
            self.done = True
        else:
            self.error = error
            if not self.head.done():
                self.head.set_exception(error)
                self.head.exception()  # retrieved: a failure before the answer is raised by `request`
        self._wake()


class _Connection(asyncio.Protocol):
    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.exchange: Exchange | None = None
        self.closed = False
        self.paused = False
        self.last_data = self.idle_since = 0.0
        self._headers: list[tuple[bytes, bytes]] = []

    def send(self, data: bytes, body: bytes) -> Exchange:
        self.exchange = exchange = Exchange(self)
        self.last_data = time.monotonic()
        exchange.timer = self.loop.call_later(READ_TIMEOUT, self._check_silence, exchange)
        if len(body) <= 65536:
            self.transport.write(data + body)
        else:
            self.transport.write(data)
            self.transport.write(body)
        return exchange

    def pause(self) -> None:
        if not self.paused and not self.closed:
            self.paused = True
            self.transport.pause_reading()

    def resume_for(self, exchange: Exchange) -> None:
        if self.paused and self.exchange is exchange and exchange.buffered < LOW_WATER:
            self.paused = False
            self.transport.resume_reading()

    def _check_silence(self, exchange: Exchange) -> None:
        if self.exchange is not exchange:
            return
        quiet = time.monotonic() - self.last_data
        if quiet < READ_TIMEOUT:
            exchange.timer = self.loop.call_later(READ_TIMEOUT - quiet, self._check_silence, exchange)
            return
        exchange._finish(UpstreamBroken(f"no answer for {READ_TIMEOUT:.0f} s"))
        self.transport.abort()

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.last_data = time.monotonic()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            if self.exchange is not None:
                self.exchange._finish(UpstreamBroken(f"malformed answer: {exc}"))
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.forget(self)
        exchange, self.exchange = self.exchange, None
        if exchange is not None:
            exchange._finish(UpstreamBroken("the backend closed the connection") if exchange.started
                             else _Stale("closed before answering"))

    # httptools callbacks
    def on_message_begin(self) -> None:
        self._headers = []
        if self.exchange is not None:
            self.exchange.started = True

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        exchange = self.exchange
        if exchange is None:
            return
        exchange.status = self.parser.get_status_code()
        exchange.headers = self._headers
        if exchange.status < 200:  # 1xx: an interim answer; the real one follows
            self.exchange.started = False
            return
        if not exchange.head.done():
            exchange.head.set_result(None)

    def on_body(self, body: bytes) -> None:
        if self.exchange is not None:
            self.exchange._feed(body)

    def on_message_complete(self) -> None:
        exchange = self.exchange
        if exchange is None or exchange.status < 200:
            return
        self.exchange = None
        exchange._finish()
        if self.parser.should_keep_alive() and not self.closed:
            if self.paused:
                self.paused = False
                self.transport.resume_reading()
            self.pool.release(self)
        else:
            self.transport.close()


class Pool:
    """Keep-alive connections to one backend address, newest first (the least likely to have timed out)."""

    def __init__(self, host: str, port: int, loop: asyncio.AbstractEventLoop) -> None:
        self.host, self.port, self.loop = host, port, loop
        self.idle: list[_Connection] = []
        self._reaper: asyncio.TimerHandle | None = None

    def release(self, conn: _Connection) -> None:
        if len(self.idle) >= MAX_IDLE:
            conn.transport.close()
            return
        conn.idle_since = time.monotonic()
        self.idle.append(conn)
        if self._reaper is None:
            self._reaper = self.loop.call_later(IDLE_TIMEOUT, self._reap)

    def _reap(self) -> None:
        """Close what sat idle for IDLE_TIMEOUT; look again while anything is idle."""
        now = time.monotonic()
        for conn in [c for c in self.idle if now - c.idle_since >= IDLE_TIMEOUT]:
            self.idle.remove(conn)
            conn.transport.close()
        self._reaper = self.loop.call_later(IDLE_TIMEOUT / 2, self._reap) if self.idle else None

    def forget(self, conn: _Connection) -> None:
        if conn in self.idle:
            self.idle.remove(conn)

    async def _connect(self) -> _Connection:
        try:
            _, conn = await asyncio.wait_for(
                self.loop.create_connection(lambda: _Connection(self), self.host, self.port), CONNECT_TIMEOUT)
        except OSError as exc:  # refused, unreachable, or TimeoutError
            raise ConnectFailed(f"{self.host}:{self.port}: {exc or type(exc).__name__}") from exc
        return conn

    async def request(self, head: bytes, body: bytes) -> Exchange:
        """Send one request; returns once the answer's status and headers are in. ConnectFailed: no connection, or a
        new one closed before any byte of answer (the request may go to another replica)."""
        while self.idle:
            conn = self.idle.pop()
            if conn.closed:
                continue
            try:
                return await _answered(conn.send(head, body))
            except _Stale:
                continue  # the backend closed it while it was idle: try a new one
        try:
            return await _answered((await self._connect()).send(head, body))
        except _Stale as exc:
            # A fresh connection closed before a single byte of answer: the backend is going (a kill -9 between
            # accept and read); like a refused connection, another replica may take the request.
            raise ConnectFailed(f"{self.host}:{self.port}: closed a new connection without answering") from exc


async def _answered(exchange: Exchange) -> Exchange:
    try:
        await exchange.head
    except asyncio.CancelledError:
        exchange.abort()  # nobody waits for this answer any more: the backend need not work on it
        raise
    return exchange


async def answers_health_check(host: str, port: int, path: str, head: bytes, timeout: float) -> bool:
    """Whether a backend answers GET `path` with 200 within `timeout` seconds, on a connection of its own (`head`:
    the replica's own header lines, its host and secret)."""
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port)
            try:
                writer.write(b"GET %s HTTP/1.1\r\n%sconnection: close\r\n\r\n" % (path.encode(), head))
                status_line = await reader.readline()
            finally:
                writer.close()
    except (OSError, TimeoutError, ValueError):
        return False
    parts = status_line.split(b" ", 2)
    return len(parts) >= 2 and parts[0].startswith(b"HTTP/") and parts[1] == b"200"


class Pools:
    """The pools of the running event loop (uvicorn runs one per process; a test may run several in turn)."""

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self.pools: dict[tuple[str, int], Pool] = {}

    def get(self, host: str, port: int) -> Pool:
        loop = asyncio.get_running_loop()
        if loop is not self.loop:
            self.loop, self.pools = loop, {}
        pool = self.pools.get((host, port))
        if pool is None:
            pool = self.pools[(host, port)] = Pool(host, port, loop)
        return pool


POOLS = Pools()
