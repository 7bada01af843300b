"""Where backends are installed (`AIMIND_CACHE_DIR/backends/<name>/<version>/<variant>/`), and the pieces every
installer shares: one install at a time per directory (a file lock, across processes), a marker that says the
install finished (a half-done one is never used), commands whose output becomes progress, and pip's verdicts.
Nothing here needs Django or a database."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from workers_app.backends.base import BackendError, version_problem

logger = logging.getLogger(__name__)
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
TRANSCRIPT_BYTES = 20 * 1024**2  # the install transcript moves to install.log.1 past this


def transcript_path() -> Path:
    """Every install command's whole output, appended (the console and the instance only get its progress)."""
    return cache_dir() / "logs" / "install.log"


def _open_transcript(cmd: list[str]):
    path = transcript_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists() and path.stat().st_size > TRANSCRIPT_BYTES:
            os.replace(path, path.with_name(path.name + ".1"))
        out = open(path, "a", encoding="utf-8", errors="replace")  # noqa: SIM115 - closed by run()
        out.write(f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} $ {' '.join(cmd)}\n")
        return out
    except OSError as exc:  # a read-only cache dir: the install itself may still work
        logger.warning("cannot keep the install's output in %s: %s", path, exc)
        return None


class PipProgress:
    """A `pip install`'s progress as a percentage: its dry run said how many packages it will install; each new
    package pip starts on ("Collecting x" from an index, "Processing x.whl" from a file) brings the download part
    (to 90 %) a step further, and "Successfully installed" ends it. pip's other lines are left to the transcript."""

    DOWNLOADED = 90

    def __init__(self, total: int, what: str):
        self.total = total
        self.what = what
        self.started: set[str] = set()
        self.shown = -STEP_PERCENT

    def feed(self, line: str) -> str | None:
        """The progress line this line of pip's output makes worth showing, if any."""
        text = line.strip()
        if text.startswith(("Collecting ", "Processing ")) and not line[0].isspace():
            name = package_name(text.split(None, 1)[1])
            if name in self.started or len(self.started) >= self.total:
                return None
            self.started.add(name)
            return self._at(self.DOWNLOADED * (len(self.started) - 1) // self.total,
                            f"{len(self.started)}/{self.total} packages")
        if text.startswith("Installing collected packages"):
            return self._at(self.DOWNLOADED, f"installing {self.total} packages", always=True)
        if text.startswith("Successfully installed"):
            return self._at(100, f"{self.total} packages installed", always=True)
        if text.startswith("ERROR:"):
            return text[:300]
        return None

    def _at(self, percent: int, detail: str, always: bool = False) -> str | None:
        if not always and percent < self.shown + STEP_PERCENT:
            return None
        self.shown = percent
        return f"{self.what}: {percent} % ({detail})"


def package_name(requirement: str) -> str:
    """The normalised project name in what follows pip's "Collecting" (a requirement: `torch==2.8 (from vllm)`) or
    "Processing" (a file: `/wheels/idna-3.20-py3-none-any.whl (from requests)`)."""
    first = requirement.split()[0]
    if "/" in first or first.endswith((".whl", ".tar.gz", ".zip")):
        first = first.rsplit("/", 1)[-1].split("-", 1)[0]
    found = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", first)
    return re.sub(r"[-_.]+", "-", found.group(0)).lower() if found else first.lower()


def is_pip_install(cmd: list[str]) -> bool:
    if cmd[1:3] != ["-m", "pip"] or "--dry-run" in cmd:
        return False
    return next((arg for arg in cmd[3:] if not arg.startswith("-")), "") == "install"


def packages_to_install(cmd: list[str], cwd: Path | None, env: dict, out=None) -> int | None:
    """How many packages this `pip install` will install, from pip's own dry run (a resolve: metadata only);
    None when the dry run fails (the install itself then says why, or goes on without a percentage). The dry
    run's own output goes to `out` (the transcript)."""
    with tempfile.TemporaryDirectory(prefix="aimind-pip-report-") as tmp:
        report = Path(tmp) / "report.json"
        dry_run = [*cmd, "--dry-run", "--quiet", "--report", str(report)]
        done = subprocess.run(dry_run, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, errors="replace", check=False)
        if out is not None:
            out.write(f"$ {' '.join(dry_run)}\n{done.stdout}")
        try:
            return len(json.loads(report.read_text())["install"]) if done.returncode == 0 else None
        except (OSError, ValueError, KeyError, TypeError):
            return None


def run(cmd: list[str], progress: Callable[[str], None], *, cwd: Path | None = None, env: dict | None = None,
        what: str = "") -> list[str]:
    """Run an install step; its progress goes to `progress` (a build's or a pip install's percentage every few
    percent, otherwise its notable lines) and its whole output to the install transcript. Returns the last
    lines; raises BackendError (permanent when pip says the version is not on the index) if it fails."""
    progress(f"$ {' '.join(cmd)}")
    full_env = {**os.environ, **(env or {})}
    out = _open_transcript(cmd)
    counter = None
    if is_pip_install(cmd):
        progress(f"{what or 'pip install'}: finding the packages to install")
        total = packages_to_install(cmd, cwd, full_env, out)
        if total:
            counter = PipProgress(total, what or "pip install")
    tail: list[str] = []
    said: set[str] = set()  # the lines shown as they came
    proc = subprocess.Popen(cmd, cwd=cwd, env=full_env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True, errors="replace")
    assert proc.stdout is not None
    shown = -STEP_PERCENT  # a build's percentage last shown
    try:
        for raw in proc.stdout:
            line = raw.rstrip()
            if not line:
                continue
            if out is not None:
                out.write(line + "\n")
            logger.debug("%s", line)
            tail = (tail + [line])[-40:]
            build = _BUILD_PERCENT.match(line)
            if counter is not None:
                news = counter.feed(line)
                if news:
                    said.add(news)
                    progress(news)
            elif build:  # cmake: "[ 42%] Building CXX object …", a line per file; a line per few percent is enough
                percent = int(build.group(1))
                if percent < shown:  # a new phase counts from 0 again
                    shown = -STEP_PERCENT
                if percent >= shown + STEP_PERCENT or (percent == 100 and shown < 100):
                    shown = percent
                    progress(f"{what or 'building'}: {percent} %")
            elif line.lstrip().startswith(_PROGRESS_WORDS) or line.startswith("[") or line.startswith("+"):
                said.add(line.strip()[:300])
                progress(line.strip()[:300])
    except BaseException:
        proc.kill()  # the caller failed while it ran: never leave an installer behind
        proc.wait()
        raise
    finally:
        if out is not None:
            out.close()
    code = proc.wait()
    if code:
        errors = [line.strip()[:300] for line in tail if "error" in line.lower()]
        for line in [line for line in errors if line not in said][-10:]:  # pip's or the compiler's own words
            progress(line)
        progress(f"{what or cmd[0]} failed: its whole output is in {transcript_path()}")
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
