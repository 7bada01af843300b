"""Find or build the llama.cpp server binaries ("llama-box") and cache them by version.

Runs without Django so `make setup` can call it before the venv has a database:
    python -m workers_app.backends.llama_box_install
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

# The llama.cpp tree vendored in this sdist is what we build; bump both together.
LLAMA_CPP_PYTHON_VERSION = "0.3.36"
CMAKE_FLAGS = [
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=OFF",  # a -march=native build dies with SIGILL on other CPUs sharing the cache
    "-DGGML_RPC=ON",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
]
TARGETS = ["llama-server", "ggml-rpc-server"]


@dataclass(frozen=True)
class LlamaBinaries:
    server: Path
    rpc_server: Path | None
    version: str
    is_llama_box: bool = False


def cache_dir() -> Path:
    return Path(os.environ.get("AIMIND_CACHE_DIR") or Path.home() / ".cache" / "aimind").expanduser()


def install_dir(version: str = LLAMA_CPP_PYTHON_VERSION) -> Path:
    return cache_dir() / "backends" / "llama-box" / f"llama-cpp-python-{version}"


def find() -> LlamaBinaries | None:
    """A `llama-box` on PATH wins; else the cached build; else None."""
    on_path = shutil.which("llama-box")
    if on_path:
        rpc = shutil.which("ggml-rpc-server") or shutil.which("rpc-server")
        return LlamaBinaries(Path(on_path), Path(rpc) if rpc else None, "path", is_llama_box=True)
    bin_dir = install_dir() / "bin"
    server = bin_dir / "llama-server"
    if server.is_file() and os.access(server, os.X_OK):
        rpc = bin_dir / "ggml-rpc-server"
        return LlamaBinaries(server, rpc if rpc.is_file() else None, LLAMA_CPP_PYTHON_VERSION)
    return None


def _run(cmd: list[str], cwd: Path | None = None) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=cwd, check=True)


def _fetch_source(work: Path) -> Path:
    _run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", "llama-cpp-python",
          f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}", "-d", str(work)])
    sdist = next(work.glob("llama_cpp_python-*.tar.gz"))
    with tarfile.open(sdist) as tar:
        tar.extractall(work, filter="data")
    return next(work.glob("llama_cpp_python-*/vendor/llama.cpp"))


def build(jobs: int | None = None) -> LlamaBinaries:
    target = install_dir()
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two set-ups at once build once
        found = find()
        if found and not found.is_llama_box:
            return found
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as tmp:
            work = Path(tmp)
            src = _fetch_source(work)
            build_dir = work / "build"
            _run(["cmake", "-S", str(src), "-B", str(build_dir), *CMAKE_FLAGS])
            _run(["cmake", "--build", str(build_dir), "--config", "Release", "-j", str(jobs or os.cpu_count() or 2),
                  "--target", *TARGETS])
            staged = work / "install" / "bin"
            staged.mkdir(parents=True)
            for name in TARGETS:
                shutil.copy2(build_dir / "bin" / name, staged / name)
                if shutil.which("strip"):
                    subprocess.run(["strip", str(staged / name)], check=False)
            if target.exists():
                shutil.rmtree(target)
            os.rename(work / "install", target)  # atomic: a half-built tree is never "found"
    found = find()
    assert found is not None
    return found


def ensure() -> LlamaBinaries:
    return find() or build()


if __name__ == "__main__":
    binaries = ensure()
    print(f"llama-box backend: {binaries.server}")
