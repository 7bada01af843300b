"""What every hub source shares: the error type, file entries, the interface and a fast reachability check."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

PROBE_TIMEOUT_S = 5.0
PROBE_TTL_S = 10.0
_PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")
_reachable_at: dict[str, float] = {}  # endpoint -> time.monotonic() of its last successful probe
HF_DEFAULT_ENDPOINT = "https://huggingface.co"
MS_DEFAULT_ENDPOINT = "https://www.modelscope.cn"


def hf_endpoint() -> str:
    """Read at call time (huggingface_hub itself reads HF_ENDPOINT once, at import)."""
    return (os.environ.get("HF_ENDPOINT") or HF_DEFAULT_ENDPOINT).rstrip("/")


def ms_endpoint() -> str:
    """Read at call time; a bare host gets https:// as the modelscope client does."""
    endpoint = (os.environ.get("MODELSCOPE_ENDPOINT") or MS_DEFAULT_ENDPOINT).strip().rstrip("/")
    return endpoint if "://" in endpoint else f"https://{endpoint}"


def partial_dir(target_dir: Path) -> Path:
    """Where partial downloads and version markers of a repo's cache folder live (not part of the model)."""
    return Path(target_dir) / ".aimind-partial"


class SourceError(Exception):
    """A hub said no, or could not be asked: status 404 not found, 403 gated/unauthorized, 502 unreachable/other
    (400 for a malformed repo id)."""

    def __init__(self, message: str, status: int = 502):
        super().__init__(message)
        self.message = message
        self.status = status


@dataclass(frozen=True)
class FileEntry:
    path: str
    size: int


def compact(text: str, limit: int = 500) -> str:
    """One line, bounded: the clients' messages span lines (request dumps, hints)."""
    line = " ".join(part.strip() for part in str(text).splitlines() if part.strip())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def status_for(http_status: int | None) -> int:
    if http_status in (401, 403):
        return 403
    if http_status == 404:
        return 404
    if http_status == 400:
        return 400
    return 502


@contextmanager
def client_errors(endpoint: str, caught: tuple[type[BaseException], ...],
                  translate: Callable[[BaseException, str], SourceError]) -> Iterator[None]:
    """A hub client's exceptions (`caught`) leave as SourceErrors carrying the hub's message."""
    try:
        yield
    except SourceError:
        raise
    except caught as exc:
        raise translate(exc, endpoint) from exc


def ensure_reachable(hub: str, endpoint: str) -> None:
    """Fail in milliseconds when nothing listens at the endpoint: the clients retry connection errors with
    back-off (huggingface_hub's list_models ~23 s, modelscope's file listing ~7 s) before giving up."""
    if any(os.environ.get(var) for var in _PROXY_VARS):
        return  # a proxy reaches the hub for us: a direct connect proves nothing
    now = time.monotonic()
    if now - _reachable_at.get(endpoint, float("-inf")) < PROBE_TTL_S:
        return
    parts = urlsplit(endpoint)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname or "", port), timeout=PROBE_TIMEOUT_S).close()
    except OSError as exc:
        raise SourceError(f"{hub} is unreachable at {endpoint}: {exc}", 502) from exc
    _reachable_at[endpoint] = now


class DownloadCancelled(Exception):
    """The instance that wanted these files is gone: stop fetching (what is on disk stays, for a later resume)."""


_cancel = threading.local()


@contextmanager
def cancellable(should_stop: Callable[[], bool]):
    """Within this block, a download in this thread stops (DownloadCancelled) once `should_stop()` says so:
    checked between files and, where our own code reads the body, between chunks."""
    _cancel.check = should_stop
    try:
        yield
    finally:
        _cancel.check = None


def check_cancelled() -> None:
    check = getattr(_cancel, "check", None)
    if check is not None and check():
        raise DownloadCancelled()


class Source:
    """A model hub: search, list, resolve patterns, give direct URLs and download with the hub's own client."""

    name: str = ""

    @property
    def endpoint(self) -> str:
        raise NotImplementedError

    def search(self, query: str, gguf: bool = False, limit: int = 50) -> list[dict]:
        raise NotImplementedError

    def list_files(self, repo: str, revision: str = "main") -> list[FileEntry]:
        raise NotImplementedError

    def file_url(self, repo: str, path: str, revision: str = "main") -> str:
        raise NotImplementedError

    def download(self, repo: str, paths: list[str], target_dir: Path, revision: str = "main") -> Path:
        raise NotImplementedError

    def resolve(self, repo: str, pattern: str, revision: str = "main") -> list[FileEntry]:
        from models_app.sources.grouping import match_files

        return match_files(self.list_files(repo, revision), pattern)
