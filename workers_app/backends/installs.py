"""Where backends are installed (`AIMIND_CACHE_DIR/backends/<name>/<version>/<variant>/`), and the pieces every
installer shares: one install at a time per directory (a file lock, across processes), a marker that says the
install finished (a half-done one is never used), commands whose output becomes progress, and pip's verdicts.
Nothing here needs Django or a database."""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from workers_app.backends.base import BackendError, version_problem

MARKER = ".installed.json"
# pip's words for "that version is not on the index". They also come when the index cannot be reached; only a list
# of the versions that do exist ("from versions: 0.1, 0.2") shows the index was read.
_NOT_ON_INDEX = re.compile(r"Could not find a version that satisfies the requirement (\S+) \(from versions: ([^)]*)\)")
_PROGRESS_WORDS = ("Collecting", "Downloading", "Installing collected", "Successfully", "Building", "Linking",
                   "Uninstalling", "Using cached")


def cache_dir() -> Path:
    return Path(os.environ.get("AIMIND_CACHE_DIR") or Path.home() / ".cache" / "aimind").expanduser()


def install_dir(name: str, version: str, variant: str = "") -> Path:
    """The real path (symlinks resolved): a virtualenv records its own location in its scripts and must keep
    working when the link it was reached through is gone."""
    problem = version_problem(version)
    if problem:
        raise BackendError(problem, permanent=True)
    path = (cache_dir() / "backends").resolve() / name / version
    return path / variant if variant else path


def is_installed(path: Path) -> bool:
    return (path / MARKER).is_file()


def installed_versions(name: str, variant: str = "") -> list[str]:
    root = cache_dir() / "backends" / name
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and is_installed(p / variant if variant else p))


def read_marker(path: Path) -> dict:
    try:
        return json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return {}


def mark_installed(path: Path, **facts) -> None:
    (path / MARKER).write_text(json.dumps({"installed_at": time.time(), **facts}, indent=1))


@contextmanager
def install_lock(path: Path) -> Iterator[None]:
    """One installer per directory at a time, across processes; the second waits and then finds it done."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def fresh_dir(path: Path) -> None:
    """An unfinished install (no marker) is thrown away before another try."""
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)


def discard(path: Path) -> None:
    """After an install that can never succeed (no such version): leave no directory that names that version."""
    shutil.rmtree(path, ignore_errors=True)
    version_dir = path if path.parent.parent.name == "backends" else path.parent
    if version_dir.is_dir() and all(p.name.startswith(".") and p.is_file() for p in version_dir.iterdir()):
        shutil.rmtree(version_dir, ignore_errors=True)


STEP_PERCENT = 5
_BUILD_PERCENT = re.compile(r"^\[\s*(\d{1,3})%\]")


def run(cmd: list[str], progress: Callable[[str], None], *, cwd: Path | None = None, env: dict | None = None,
        what: str = "") -> list[str]:
    """Run an install step; its notable output lines go to `progress`. Returns the last lines; raises
    BackendError (permanent when pip says the version is not on the index) if it fails."""
    progress(f"$ {' '.join(cmd)}")
    tail: list[str] = []
    proc = subprocess.Popen(cmd, cwd=cwd, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True, errors="replace")
    assert proc.stdout is not None
    shown = -STEP_PERCENT  # a build's percentage last shown
    try:
        for raw in proc.stdout:
            line = raw.rstrip()
            if not line:
                continue
            tail = (tail + [line])[-40:]
            build = _BUILD_PERCENT.match(line)
            if build:  # cmake: "[ 42%] Building CXX object …", a line per file; a line per few percent is enough
                percent = int(build.group(1))
                if percent < shown:  # a new phase counts from 0 again
                    shown = -STEP_PERCENT
                if percent >= shown + STEP_PERCENT or (percent == 100 and shown < 100):
                    shown = percent
                    progress(f"{what or 'building'}: {percent} %")
            elif line.lstrip().startswith(_PROGRESS_WORDS) or line.startswith("[") or line.startswith("+"):
                progress(line.strip()[:300])
    except BaseException:
        proc.kill()  # the caller failed while it ran: never leave an installer behind
        proc.wait()
        raise
    code = proc.wait()
    if code:
        raise pip_failure(tail, what or cmd[0], code)
    return tail


def pip_failure(tail: list[str], what: str, code: int) -> BackendError:
    for line in tail:
        found = _NOT_ON_INDEX.search(line)
        if found and found.group(2).strip() not in ("", "none"):
            return BackendError(f"{what}: {found.group(1)} is not on the package index (it lists "
                                f"{_last_versions(found.group(2))})", permanent=True)
    last = next((line for line in reversed(tail) if "error" in line.lower()), tail[-1] if tail else "")
    return BackendError(f"{what} failed (exit {code}): {last.strip()}")


def _last_versions(listing: str, n: int = 5) -> str:
    versions = [v.strip() for v in listing.split(",") if v.strip()]
    return ", ".join(versions[-n:]) + (f" and {len(versions) - n} older" if len(versions) > n else "")


def pip(python: Path | str, *args: str) -> list[str]:
    return [str(python), "-m", "pip", "--disable-pip-version-check", "--no-input", *args]


def make_venv(path: Path, progress: Callable[[str], None]) -> Path:
    """A virtualenv at `path` on this interpreter's base Python; returns its python."""
    base = getattr(sys, "_base_executable", sys.executable)
    run([base, "-m", "venv", str(path)], progress, what="creating the virtualenv")
    return path / "bin" / "python"
