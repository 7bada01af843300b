"""Which versions of a backend exist: what the package index lists for its packages (asked through pip, so the
node's pip configuration — mirrors, find-links, proxies — applies), cached for a while. None means the index
could not be asked: then nobody can tell, and a worker's install decides."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time

from workers_app.backends.base import Backend

CACHE_SECONDS = 600
UNANSWERED_CACHE_SECONDS = 60  # an index that did not answer is not asked again on every save
TIMEOUT_SECONDS = 10
_AVAILABLE = re.compile(r"^Available versions:\s*(.+)$", re.MULTILINE)
_cache: dict[str, tuple[float, list[str] | None]] = {}
_lock = threading.Lock()


def index_versions(package: str) -> list[str] | None:
    with _lock:
        cached = _cache.get(package)
    if cached and time.monotonic() - cached[0] < (CACHE_SECONDS if cached[1] is not None
                                                  else UNANSWERED_CACHE_SECONDS):
        return cached[1]
    versions = _ask_pip(package)
    with _lock:
        _cache[package] = (time.monotonic(), versions)
    return versions


def _ask_pip(package: str) -> list[str] | None:
    """The versions the index lists; None when it did not say (unreachable, or no such package: pip words both
    alike, and for our own packages only the first can be true)."""
    try:
        done = subprocess.run([sys.executable, "-m", "pip", "index", "versions", package, "--pre",
                               "--disable-pip-version-check", "--no-input"], capture_output=True, text=True,
                              timeout=TIMEOUT_SECONDS, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    found = _AVAILABLE.search(done.stdout)
    return [v.strip() for v in found.group(1).split(",") if v.strip()] if found else None


def missing_version(backend: Backend, version: str) -> str | None:
    """Why `version` cannot be installed, when the index can tell; None when it exists or nobody can tell."""
    packages = backend.index_packages()
    if not version or not packages or version == backend.default_version:
        return None
    listed = [index_versions(p) for p in packages]
    if any(v is None or version in v or version.lstrip("v") in v for v in listed):
        return None
    return (f"{backend.name} version {version!r} does not exist: the package index lists no "
            f"{' or '.join(f'{p}=={version}' for p in packages)}")
