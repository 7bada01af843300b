"""A read-only, seekable file over HTTP Range requests: GGUF headers and config.json without the whole file."""

from __future__ import annotations

import io
import json
import os
import re
import time
from collections import OrderedDict
from urllib.parse import urlsplit

import httpx

from models_app.sources.base import SourceError, compact, hf_endpoint, ms_endpoint, status_for

_CONTENT_RANGE_RE = re.compile(r"bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)")
MIN_BLOCK = 1 << 20
TRANSPORT_RETRIES = 2


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    return parts.scheme, (parts.hostname or "").lower(), parts.port


def auth_headers(url: str) -> dict[str, str]:
    """The hub token for a URL on that hub (HF_TOKEN, MODELSCOPE_API_TOKEN); never sent elsewhere."""
    origin = _origin(url)
    for endpoint, var in ((hf_endpoint(), "HF_TOKEN"), (ms_endpoint(), "MODELSCOPE_API_TOKEN")):
        token = os.environ.get(var)
        if token and origin == _origin(endpoint):
            return {"Authorization": f"Bearer {token}"}
    return {}


def _error_message(response: httpx.Response, body: bytes) -> str:
    message = response.headers.get("X-Error-Message")
    if not message:
        try:
            data = json.loads(body)
            message = next((str(data[k]) for k in ("error", "Message", "message", "detail") if data.get(k)), "")
        except (ValueError, AttributeError):
            message = body[:300].decode("utf-8", "replace")
    return compact(f"HTTP {response.status_code} for {response.request.url}: {message}")


class RangeFile(io.RawIOBase):
    """Reads `url` in blocks of >= 1 MiB (a small LRU cache of them); `bytes_fetched` counts body bytes received.

    A hub redirect (to a CDN) is remembered, so later ranges skip the extra round trip; the Authorization header
    goes only to the URL's own origin."""

    def __init__(self, url: str, headers: dict[str, str] | None = None, *, block_size: int = MIN_BLOCK,
                 cache_blocks: int = 8, timeout: float = 30.0, client: httpx.Client | None = None):
        super().__init__()
        self.url = url
        self.block_size = max(block_size, MIN_BLOCK)
        self.cache_blocks = max(cache_blocks, 2)
        self.headers = {**auth_headers(url), **(headers or {})}
        self._client = client or httpx.Client(follow_redirects=True, timeout=timeout)
        self._own_client = client is None
        self._blocks: OrderedDict[int, bytes] = OrderedDict()
        self._resolved: str | None = None
        self._size: int | None = None
        self._pos = 0
        self.bytes_fetched = 0
        self.requests = 0

    # -- io.RawIOBase ---------------------------------------------------------------------------------------------
    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos}.get(whence)
        if base is None:
            base = self.size
        if base + offset < 0:
            raise ValueError(f"negative seek position {base + offset}")
        self._pos = base + offset
        return self._pos

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            size = max(0, self.size - self._pos)  # one read to the end, not RawIOBase's 8 KiB loop
        buf = bytearray(size)
        return bytes(buf[: self.readinto(buf)])

    def readinto(self, buffer) -> int:
        out = memoryview(buffer).cast("B")
        end = min(self._pos + len(out), self.size)
        written = 0
        while self._pos < end:
            index = self._pos // self.block_size
            block = self._block(index, (end - 1) // self.block_size)
            offset = self._pos - index * self.block_size
            take = min(len(block) - offset, end - self._pos)
            if take <= 0:
                break  # the file shrank under us
            out[written:written + take] = block[offset:offset + take]
            written += take
            self._pos += take
        return written

    def close(self) -> None:
        if not self.closed and self._own_client:
            self._client.close()
        self._blocks.clear()
        super().close()

    # -- ranges ---------------------------------------------------------------------------------------------------
    @property
    def size(self) -> int:
        if self._size is None:
            self._block(0, 0)
        assert self._size is not None
        return self._size

    def _block(self, index: int, last: int) -> bytes:
        if index in self._blocks:
            self._blocks.move_to_end(index)
            return self._blocks[index]
        run = index  # fetch the uncached blocks this read needs in one request (capped by the cache)
        while run < last and run + 1 not in self._blocks and run - index + 1 < self.cache_blocks:
            run += 1
        start = index * self.block_size
        data = self._fetch(start, (run + 1) * self.block_size - 1)
        for i in range(index, run + 1):
            chunk = data[(i - index) * self.block_size:(i - index + 1) * self.block_size]
            if chunk:
                self._blocks[i] = chunk
        while len(self._blocks) > self.cache_blocks:
            self._blocks.popitem(last=False)
        return data[: self.block_size]

    def _fetch(self, start: int, end: int) -> bytes:
        """Bytes start..end (inclusive, clipped to the file); learns the size from Content-Range."""
        if self._size is not None:
            end = min(end, self._size - 1)
            if start > end:
                return b""
        attempt = 0
        while True:
            url = self._resolved or self.url
            headers = {**self.headers, "Range": f"bytes={start}-{end}"}
            if _origin(url) != _origin(self.url):
                headers.pop("Authorization", None)
            try:
                return self._get(url, headers, start, end)
            except httpx.TransportError as exc:
                attempt += 1
                if attempt > TRANSPORT_RETRIES:
                    raise SourceError(compact(f"cannot read {self.url}: {exc!r}"), 502) from exc
                time.sleep(0.2 * attempt)
            except SourceError:
                if url == self.url:
                    raise
                self._resolved = None  # the remembered CDN URL expired: ask the hub again

    def _get(self, url: str, headers: dict[str, str], start: int, end: int) -> bytes:
        self.requests += 1
        with self._client.stream("GET", url, headers=headers) as response:
            if response.history:
                self._resolved = str(response.url)
            total = self._total(response)
            if response.status_code == 416:
                self._size = total if total is not None else start
                return b""
            if response.status_code >= 400:
                body = b"".join(response.iter_bytes())[:65536]
                raise SourceError(_error_message(response, body), status_for(response.status_code))
            if response.status_code == 206:
                self._size = total if total is not None else self._size
                data = response.read()
                self.bytes_fetched += len(data)
                return data
            # 200: the server ignored Range; read up to what we need and hang up
            if response.headers.get("Content-Length"):
                self._size = int(response.headers["Content-Length"])
            wanted, received = bytearray(), 0
            for chunk in response.iter_bytes():
                self.bytes_fetched += len(chunk)
                lo, hi = max(start - received, 0), end + 1 - received
                if hi > 0 and lo < len(chunk):
                    wanted += chunk[lo:hi]
                received += len(chunk)
                if received > end:
                    break
            if self._size is None:
                self._size = received
            return bytes(wanted)

    @staticmethod
    def _total(response: httpx.Response) -> int | None:
        match = _CONTENT_RANGE_RE.match(response.headers.get("Content-Range", ""))
        return int(match.group(3)) if match and match.group(3) != "*" else None
