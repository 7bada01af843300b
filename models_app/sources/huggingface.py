"""Hugging Face through huggingface_hub: HfApi for search and listings, its metadata call and http_get for the
worker's files (resumable across calls)."""

from __future__ import annotations

import logging
import os
import time
from contextlib import AbstractContextManager
from pathlib import Path

import httpx
import httpx2
import requests
from huggingface_hub import HfApi, constants, get_hf_file_metadata, hf_hub_url
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

from models_app.sources.base import (
    FileEntry,
    Source,
    SourceError,
    check_cancelled,
    client_errors,
    compact,
    ensure_reachable,
    hf_endpoint,
    partial_dir,
    status_for,
)

logger = logging.getLogger(__name__)
RETRIES = 5  # attempts in a row that add no byte
CLIENT_ERRORS = (HfHubHTTPError, EntryNotFoundError, HFValidationError, httpx2.HTTPError, httpx.HTTPError,
                 requests.RequestException, OSError)
SEARCH_FIELDS = ["downloads", "likes", "tags", "gated", "pipeline_tag", "lastModified"]  # `gated` is not a default


def _token() -> str | None:
    return os.environ.get("HF_TOKEN") or None


def _message(exc: BaseException) -> str:
    """The client's headline ("Repository Not Found for url: …") plus the hub's own message, on one line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    headline = lines[1] if len(lines) > 1 and lines[0].endswith("Error.") else (lines[0] if lines else "")
    server = getattr(exc, "server_message", None)
    return compact(f"{headline} {server}" if server and server not in headline else headline or type(exc).__name__)


def to_source_error(exc: BaseException, endpoint: str) -> SourceError:
    """The client's exception as a SourceError carrying the hub's message."""
    if isinstance(exc, GatedRepoError):  # before RepositoryNotFoundError: it is one
        return SourceError(_message(exc), 403)
    if isinstance(exc, (RepositoryNotFoundError, RevisionNotFoundError, RemoteEntryNotFoundError)):
        return SourceError(_message(exc), 404)
    if isinstance(exc, HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else None
        return SourceError(_message(exc), status_for(status))
    if isinstance(exc, HFValidationError):
        return SourceError(_message(exc), 400)
    if isinstance(exc, LocalEntryNotFoundError):  # what hf_hub_download raises when the hub cannot be reached
        cause = exc.__cause__ or exc.__context__
        return to_source_error(cause, endpoint) if cause is not None else SourceError(_message(exc), 502)
    if isinstance(exc, EntryNotFoundError):
        return SourceError(_message(exc), 404)
    return SourceError(compact(f"Hugging Face is unreachable at {endpoint}: {type(exc).__name__}: {exc}"), 502)


def _mapped(endpoint: str) -> AbstractContextManager[None]:
    return client_errors(endpoint, CLIENT_ERRORS, to_source_error)


def _fetch(url: str, partial: Path, size: int | None, headers: dict[str, str]) -> None:
    """GET `url` onto the end of `partial` (a Range from its length), through the client's own HTTP session; a
    dropped connection resumes where the bytes stop, up to RETRIES times without progress. Written as they arrive,
    flushed: the bytes on disk are the progress the instance shows, and what a later call resumes from
    (the client's http_get holds 10 MB per write)."""
    stalled = 0
    while True:
        have = partial.stat().st_size if partial.exists() else 0
        if size is not None and have > size:  # not a prefix of this file: start again
            partial.unlink()
            have = 0
        if size is not None and have == size:
            return
        ranged = {**headers, "Range": f"bytes={have}-"} if have else headers
        before = have
        try:
            with get_session().stream("GET", url, headers=ranged, follow_redirects=True,
                                      timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT) as response:
                hf_raise_for_status(response)
                with open(partial, "ab" if response.status_code == 206 else "wb") as out:  # 200: the whole file
                    for chunk in response.iter_bytes():  # as they arrive (a chunk_size would hold them back)
                        out.write(chunk)
                        out.flush()
                        check_cancelled()
            if size is None or partial.stat().st_size == size:
                return
            problem: Exception = SourceError(f"the hub ended {partial.name} short of {size} bytes", 502)
        except (httpx2.TransportError, httpx.TransportError) as exc:
            problem = exc
        now = partial.stat().st_size if partial.exists() else 0
        stalled = 0 if now > before else stalled + 1
        if stalled > RETRIES:
            raise problem
        logger.info("download of %s interrupted at %d bytes (%s); resuming", url, now, problem)
        time.sleep(min(1.0, 0.2 * (stalled + 1)))


class HuggingFaceSource(Source):
    name = "huggingface"

    @property
    def endpoint(self) -> str:
        return hf_endpoint()

    def _api(self) -> HfApi:
        return HfApi(endpoint=self.endpoint, token=_token())

    def search(self, query: str, gguf: bool = False, limit: int = 50) -> list[dict]:
        endpoint = self.endpoint
        ensure_reachable(self.name, endpoint)
        with _mapped(endpoint):
            models = self._api().list_models(search=query or None, filter="gguf" if gguf else None, limit=limit,
                                             sort="downloads", expand=SEARCH_FIELDS)
            results = []
            for m in models:
                tags = list(m.tags or [])
                results.append({"id": m.id, "downloads": m.downloads or 0, "likes": m.likes or 0, "tags": tags,
                                "gguf": "gguf" in tags or m.id.lower().endswith("gguf"),
                                "gated": bool(m.gated), "pipeline_tag": m.pipeline_tag})
        return results

    def list_files(self, repo: str, revision: str = "main") -> list[FileEntry]:
        endpoint = self.endpoint
        ensure_reachable(self.name, endpoint)
        with _mapped(endpoint):
            info = self._api().model_info(repo, revision=revision or None, files_metadata=True)
            files = [FileEntry(s.rfilename, (s.lfs.size if s.lfs else s.size) or 0) for s in info.siblings or []]
            if info.gated and files:  # the listing is public, the bytes are not: tell now, not at download time
                get_hf_file_metadata(hf_hub_url(repo, files[0].path, revision=revision, endpoint=endpoint),
                                     token=_token())
        return sorted(files, key=lambda f: f.path)

    def file_url(self, repo: str, path: str, revision: str = "main") -> str:
        return hf_hub_url(repo, path, revision=revision or "main", endpoint=self.endpoint)

    def download(self, repo: str, paths: list[str], target_dir: Path, revision: str = "main") -> Path:
        """Each file through the client's own metadata call and `http_get`, into a partial file kept across calls:
        hf_hub_download resumes within one call only (its temporary file is unique to the call and removed when it
        fails), and a worker that dies half-way through a 40 GB file must not start again from byte 0."""
        endpoint = self.endpoint
        ensure_reachable(self.name, endpoint)
        local = []
        with _mapped(endpoint):
            for path in paths:
                check_cancelled()
                local.append(self._download_one(repo, path, Path(target_dir), revision or "main", endpoint))
        return local[0]

    def _download_one(self, repo: str, path: str, target_dir: Path, revision: str, endpoint: str) -> Path:
        url = hf_hub_url(repo, path, revision=revision, endpoint=endpoint)
        meta = get_hf_file_metadata(url, token=_token(), endpoint=endpoint)
        dest = target_dir / path
        etag = (meta.etag or meta.commit_hash or "unknown").strip('"')
        marker = partial_dir(target_dir) / f"{path}.etag"
        if dest.is_file() and dest.stat().st_size == meta.size and marker.is_file() and marker.read_text() == etag:
            return dest  # already here, and the hub still has this version
        partial = partial_dir(target_dir) / f"{path}.{etag[:16]}.incomplete"
        partial.parent.mkdir(parents=True, exist_ok=True)
        for stale in partial.parent.glob(f"{Path(path).name}.*.incomplete"):
            if stale != partial:  # an older version of the file: its bytes are no use
                stale.unlink(missing_ok=True)
        _fetch(meta.location, partial, meta.size, build_hf_headers(token=_token()))
        if meta.size is not None and partial.stat().st_size != meta.size:
            raise SourceError(f"{path}: got {partial.stat().st_size} bytes of {meta.size}; will resume", 502)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(partial, dest)
        marker.write_text(etag)
        return dest
