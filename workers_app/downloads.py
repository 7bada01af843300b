"""Model files from a hub, downloaded by the worker into the shared cache (`AIMIND_CACHE_DIR/models/<hub>/<repo>`):
one download of a repo's files at a time (a file lock shared by every instance and worker process on the machine),
resumable after an interruption (partial files are kept), progress measured from the bytes on disk."""

from __future__ import annotations

import fcntl
import json
import logging
import shutil
import threading
from collections.abc import Callable
from pathlib import Path

from django.conf import settings

from models_app.models import Model
from models_app.sources import FileEntry, SourceError, get_source, hub_spec, model_ggufs
from models_app.sources.base import partial_dir
from scheduler_app.resources import gib

logger = logging.getLogger(__name__)
PROGRESS_EVERY_SECONDS = 1.0
MANIFEST = ".aimind-files.json"  # pattern -> the files a finished download of it fetched


def repo_cache_dir(hub: str, repo: str) -> Path:
    return settings.CACHE_DIR / "models" / hub / repo.replace("/", "--")


def files_to_fetch(hub: str, repo: str, pattern: str) -> list[FileEntry]:
    source = get_source(hub)
    files = source.resolve(repo, pattern) if pattern else source.list_files(repo)
    if not files:
        raise SourceError(f"no file in {repo} matches {pattern!r}", status=404)
    return sorted(files, key=lambda f: f.path)


def _manifest(target: Path) -> dict[str, list[list]]:
    try:
        return json.loads((target / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}


def _cached_files(target: Path, pattern: str) -> list[FileEntry] | None:
    """The files an earlier, finished download of `pattern` left here, if they are all still whole."""
    entries = [FileEntry(path, size) for path, size in _manifest(target).get(pattern, [])]
    if entries and all((target / f.path).is_file() and (target / f.path).stat().st_size == f.size for f in entries):
        return entries
    return None


def _remember(target: Path, pattern: str, files: list[FileEntry]) -> None:
    manifest = _manifest(target)
    manifest[pattern] = [[f.path, f.size] for f in files]
    tmp = target / f"{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    tmp.replace(target / MANIFEST)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0  # moved from its partial name to its final one while we looked


def bytes_present(target: Path, files: list[FileEntry]) -> int:
    """Bytes of these files on disk, whole or partial (each client keeps its partial files in its own place)."""
    total = 0
    for f in files:
        final = target / f.path
        if final.is_file():
            total += min(_size(final), f.size)
            continue
        partials = [*(target / f.path).parent.glob(f"{final.name}*.incomplete"),
                    *(partial_dir(target) / f.path).parent.glob(f"{final.name}.*.incomplete")]
        total += min(max((_size(p) for p in partials), default=0), f.size)
    return total


def download(model: Model, on_progress: Callable[[float], None]) -> Path:
    """Fetch the model's files (or find them already here) and return the path the backend loads."""
    hub, repo, pattern = hub_spec(model)
    target = repo_cache_dir(hub, repo)
    offline = False
    try:
        files = files_to_fetch(hub, repo, pattern)
    except SourceError as exc:
        cached = _cached_files(target, pattern) if exc.status == 502 else None
        if cached is None:
            raise
        logger.warning("%s unreachable (%s); using the files already in %s", hub, exc, target)
        files, offline = cached, True
    target.mkdir(parents=True, exist_ok=True)
    total = sum(f.size for f in files) or 1
    with open(target / ".aimind-download.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another instance fetching this repo: wait, then reuse its files
        missing = total - bytes_present(target, files)
        free = shutil.disk_usage(target).free
        if missing > free:
            raise SourceError(f"not enough disk space in {target}: {gib(missing)} still to download, "
                              f"{gib(free)} free", status=507)
        done = threading.Event()

        def report() -> None:
            while not done.wait(PROGRESS_EVERY_SECONDS):
                on_progress(min(99.9, 100.0 * bytes_present(target, files) / total))

        reporter = threading.Thread(target=report, name=f"progress-{repo}", daemon=True)
        reporter.start()
        try:
            if not offline:
                get_source(hub).download(repo, [f.path for f in files], target)
        finally:
            done.set()
            reporter.join()
        _remember(target, pattern, files)
    on_progress(100.0)
    gguf = model_ggufs(files)
    return target / gguf[0].path if gguf else target
