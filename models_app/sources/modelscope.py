"""ModelScope through its own client (modelscope_hub, what `modelscope` delegates to): list_repos for search,
list_repo_files for listings, download_file (resumable .incomplete files, file-locked) for the worker."""

from __future__ import annotations

import os
from contextlib import AbstractContextManager
from pathlib import Path

import requests
from modelscope_hub import HubApi
from modelscope_hub.errors import (
    APIError,
    AuthenticationError,
    FileDownloadError,
    HubError,
    InvalidParameter,
    NetworkError,
    NotExistError,
    PermissionDeniedError,
)

from models_app.sources.base import (
    FileEntry,
    Source,
    SourceError,
    check_cancelled,
    client_errors,
    compact,
    ensure_reachable,
    ms_endpoint,
    status_for,
)

PAGE_SIZE = 50  # the OpenAPI model listing's largest page
MAX_OFFSET = 3000  # page_number * page_size beyond this is refused by the client


def _revision(revision: str | None) -> str:
    """ModelScope's default branch is `master`; callers speak Hugging Face's `main`."""
    return "master" if revision in (None, "", "main") else revision


def to_source_error(exc: BaseException, endpoint: str) -> SourceError:
    """The client's exception as a SourceError carrying the hub's message."""
    if isinstance(exc, requests.HTTPError) and isinstance(exc.__cause__, HubError):
        exc = exc.__cause__  # the legacy wrappers re-raise hub errors as requests.HTTPError
    if isinstance(exc, FileDownloadError) and exc.failed_files:
        exc = next(iter(exc.failed_files.values()))
    if isinstance(exc, NetworkError) and isinstance(exc.__cause__, APIError):
        exc = exc.__cause__  # e.g. a listing denied on every retry
    message = compact(exc.message if isinstance(exc, HubError) else str(exc))
    if isinstance(exc, NotExistError):
        return SourceError(message, 404)
    if isinstance(exc, (AuthenticationError, PermissionDeniedError)):
        return SourceError(message, 403)
    if isinstance(exc, InvalidParameter):
        return SourceError(message, 400)
    if isinstance(exc, APIError):
        return SourceError(compact(f"HTTP {exc.status_code}: {message}"), status_for(exc.status_code))
    return SourceError(compact(f"ModelScope is unreachable at {endpoint}: {type(exc).__name__}: {message}"), 502)


def _mapped(endpoint: str) -> AbstractContextManager[None]:
    return client_errors(endpoint, (HubError, requests.RequestException, OSError), to_source_error)


class ModelScopeSource(Source):
    name = "modelscope"

    @property
    def endpoint(self) -> str:
        return ms_endpoint()

    def _api(self, endpoint: str) -> HubApi:
        """A fresh client per call: the endpoint is read from the environment each time, and a client that once
        listed a repo takes later 403s for flukes and retries them for seconds."""
        return HubApi(endpoint=endpoint, token=os.environ.get("MODELSCOPE_API_TOKEN") or None)

    def search(self, query: str, gguf: bool = False, limit: int = 50) -> list[dict]:
        endpoint = self.endpoint
        ensure_reachable(self.name, endpoint)
        size = max(1, min(PAGE_SIZE, limit))
        repos, page = [], 1
        with _mapped(endpoint):
            api = self._api(endpoint)
            while len(repos) < limit and page * size <= MAX_OFFSET:
                paged = api.list_repos("model", search=query or None, page_number=page, page_size=size,
                                       library="gguf" if gguf else None)
                repos.extend(paged.items)
                if not paged.items or not paged.has_next:
                    break
                page += 1
        results = []
        for r in repos[:limit]:
            tags = [str(t) for t in r.tags or []]
            results.append({"id": r.repo_id, "downloads": r.downloads or 0, "likes": r.likes or 0, "tags": tags,
                            "gguf": gguf or any("gguf" in t.lower() for t in tags) or "gguf" in r.repo_id.lower(),
                            "gated": bool(r.gated), "pipeline_tag": (r.tasks or [None])[0]})
        return results

    def list_files(self, repo: str, revision: str = "main") -> list[FileEntry]:
        endpoint = self.endpoint
        ensure_reachable(self.name, endpoint)
        with _mapped(endpoint):
            files = self._api(endpoint).list_repo_files(repo, "model", revision=_revision(revision))
        return sorted((FileEntry(f.path, f.size) for f in files if not f.is_dir), key=lambda f: f.path)

    def file_url(self, repo: str, path: str, revision: str = "main") -> str:
        return self._api(self.endpoint).legacy.get_download_url(repo, "model", path, _revision(revision))

    def download(self, repo: str, paths: list[str], target_dir: Path, revision: str = "main") -> Path:
        """download_file per file into target_dir: a cut-off body is resumed from its .incomplete file, by the
        client's own retries and by a later call alike."""
        endpoint = self.endpoint
        ensure_reachable(self.name, endpoint)
        local = []
        with _mapped(endpoint):
            api = self._api(endpoint)
            for path in paths:
                check_cancelled()
                local.append(api.download_file(repo, "model", path, revision=_revision(revision), local_dir=target_dir,
                                               cache_dir=Path(target_dir) / ".cache" / "modelscope"))  # its locks
        return Path(local[0])
