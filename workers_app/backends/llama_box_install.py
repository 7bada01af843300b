"""Find or build the llama.cpp server binaries ("llama-box") of a `llama-cpp-python` version, cached per version
and variant in `AIMIND_CACHE_DIR/backends/llama-box/<version>/<variant>/bin/`.

The variant is `cpu`, or `cuda-sm<arch>` on a node whose NVML finds NVIDIA GPUs and that has a CUDA compiler
(the system's nvcc, or the `nvidia-cuda-nvcc` wheels installed into the cache): then llama.cpp is built with CUDA
for that GPU's architecture only. `make setup` builds the default with `manage.py install_backend llama-box`.
"""

from __future__ import annotations

import ctypes.util
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from workers_app.backends import installs
from workers_app.backends.base import BackendError

# The llama.cpp tree vendored in this sdist is the default build; `backend_version` picks another.
LLAMA_CPP_PYTHON_VERSION = "0.3.36"
NAME = "llama-box"
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
SERVER_TARGET = "llama-server"
RPC_TARGETS = ("ggml-rpc-server", "rpc-server")  # the rpc binary's name, newest first
# nvcc from PyPI when the node has none: only the CUDA 13.0 wheels carry it, and only pinned together.
CUDA_WHEELS = ["nvidia-cuda-nvcc==13.0.88", "nvidia-nvvm==13.0.88", "nvidia-cuda-crt==13.0.88",
               "nvidia-cuda-runtime==13.0.96", "nvidia-cublas==13.0.2.14", "nvidia-cuda-cccl==13.0.85"]


ON_PATH = "llama-box on PATH"  # the version an instance shows when that binary serves it
WHEELS = "nvidia-cuda-nvcc wheels"  # no nvcc on the node, but pip can bring one: still a CUDA build


@dataclass(frozen=True)
class LlamaBinaries:
    server: Path
    rpc_server: Path | None
    version: str
    variant: str = "cpu"
    is_llama_box: bool = False


def install_dir(version: str = LLAMA_CPP_PYTHON_VERSION, variant: str = "cpu") -> Path:
    return installs.install_dir(NAME, version, variant)


def find(version: str = "", variant: str = "cpu") -> LlamaBinaries | None:
    """A `llama-box` on PATH wins when no version is asked for; else the cached build; else None."""
    on_path = shutil.which("llama-box")
    if on_path and not version:
        rpc = shutil.which("ggml-rpc-server") or shutil.which("rpc-server")
        return LlamaBinaries(Path(on_path), Path(rpc) if rpc else None, ON_PATH, variant, is_llama_box=True)
    version = version or LLAMA_CPP_PYTHON_VERSION
    root = install_dir(version, variant)
    server = root / "bin" / SERVER_TARGET
    if installs.is_installed(root) and os.access(server, os.X_OK):
        rpc = next((root / "bin" / n for n in RPC_TARGETS if (root / "bin" / n).is_file()), None)
        return LlamaBinaries(server, rpc, version, variant)
    return None


def cuda_architecture(gpus: list[dict] | tuple[dict, ...]) -> str:
    """The architectures of these GPUs for CMAKE_CUDA_ARCHITECTURES ("90", or "86;90" for a mixed node)."""
    found = sorted({str(g.get("compute_capability", "")).replace(".", "") for g in gpus} - {""})
    return ";".join(found)


def variant_for(gpus: list[dict] | tuple[dict, ...], cuda_compiler: str) -> str:
    arch = cuda_architecture(gpus)
    if gpus and cuda_compiler and arch:
        return "cuda-sm" + arch.replace(";", "-")
    return "cpu"


def cuda_compiler() -> str:
    """What a GPU node compiles CUDA with: its nvcc, else PyPI's compiler wheels (installed when first needed)."""
    return find_nvcc() or WHEELS


def find_nvcc() -> str:
    """nvcc from CUDACXX, PATH, /usr/local/cuda, or an earlier wheel install in the cache; "" when none."""
    for candidate in (os.environ.get("CUDACXX", ""), shutil.which("nvcc") or "", "/usr/local/cuda/bin/nvcc",
                      str(cuda_toolkit_root() / "bin" / "nvcc")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return ""


def cuda_toolkit_root() -> Path:
    return installs.cache_dir() / "toolchains" / "cuda-13.0" / "root"


def install_cuda_wheels(progress: Callable[[str], None]) -> str:
    """nvcc from PyPI's CUDA 13.0 wheels, arranged as the toolkit root cmake expects. Returns nvcc's path."""
    base = cuda_toolkit_root().parent
    with installs.install_lock(base):
        nvcc = cuda_toolkit_root() / "bin" / "nvcc"
        if installs.is_installed(base) and nvcc.exists():
            return str(nvcc)
        installs.fresh_dir(base)
        python = installs.make_venv(base / "venv", progress)
        installs.run(installs.pip(python, "install", *CUDA_WHEELS), progress, what="installing the CUDA compiler")
        site = next((base / "venv" / "lib").glob("python*/site-packages"))
        cu13 = site / "nvidia" / "cu13"
        root = cuda_toolkit_root()
        (root / "bin").mkdir(parents=True)
        for tool in (cu13 / "bin").iterdir():
            (root / "bin" / tool.name).symlink_to(tool)
        for name in ("include", "nvvm"):
            (root / name).symlink_to(cu13 / name)
        lib64 = root / "lib64"  # nvcc.profile hard-codes lib64
        lib64.mkdir()
        for lib in (cu13 / "lib").iterdir():
            (lib64 / lib.name).symlink_to(lib)
            stem = lib.name.split(".so")[0]
            if ".so." in lib.name and not (lib64 / f"{stem}.so").exists():
                (lib64 / f"{stem}.so").symlink_to(lib)
        installs.mark_installed(base, wheels=CUDA_WHEELS)
        return str(nvcc)


def cmake_flags(variant: str, nvcc: str = "") -> list[str]:
    flags = list(CMAKE_FLAGS)
    if not variant.startswith("cuda-sm"):
        return flags
    arch = variant.removeprefix("cuda-sm").replace("-", ";")
    flags += ["-DGGML_CUDA=ON", f"-DCMAKE_CUDA_ARCHITECTURES={arch}", "-DGGML_CUDA_NCCL=OFF"]
    if nvcc:
        toolkit = Path(nvcc).parent.parent
        flags += [f"-DCMAKE_CUDA_COMPILER={nvcc}", f"-DCUDAToolkit_ROOT={toolkit}"]
        if not (toolkit / "lib64" / "stubs" / "libcuda.so").exists() and not ctypes.util.find_library("cuda"):
            flags.append("-DGGML_CUDA_NO_VMM=ON")  # no driver library to link against: skip the VMM pool
    return flags


def _fetch_source(version: str, work: Path, progress: Callable[[str], None]) -> Path:
    installs.run(installs.pip(sys.executable, "download", "--quiet", "--no-deps", "--no-binary", "llama-cpp-python",
                              f"llama-cpp-python=={version}", "-d", str(work)),
                 progress, what=f"llama-box version {version}")
    sdist = next(work.glob("llama_cpp_python-*.tar.gz"))
    with tarfile.open(sdist) as tar:
        tar.extractall(work, filter="data")
    return next(work.glob("llama_cpp_python-*/vendor/llama.cpp"))


def _rpc_target(build_dir: Path) -> str | None:
    listing = subprocess.run(["cmake", "--build", str(build_dir), "--target", "help"], capture_output=True,
                             text=True, check=False).stdout
    return next((t for t in RPC_TARGETS if f" {t}" in listing or f"\n{t}" in listing), None)


def build(version: str = "", variant: str = "cpu", jobs: int | None = None,
          progress: Callable[[str], None] = print) -> LlamaBinaries:
    """Build llama-server (+ the RPC server) of this llama-cpp-python version once; concurrent callers wait."""
    version = version or LLAMA_CPP_PYTHON_VERSION
    target = install_dir(version, variant)
    with installs.install_lock(target):
        found = find(version, variant)
        if found is not None:
            return found
        try:
            _build(version, variant, target, jobs, progress)
        except BackendError as exc:
            if exc.permanent:  # e.g. no such version: leave no directory that names it
                installs.discard(target)
            raise
    found = find(version, variant)
    assert found is not None
    return found


def _build(version: str, variant: str, target: Path, jobs: int | None, progress: Callable[[str], None]) -> None:
    started = time.monotonic()
    nvcc = ""
    if variant.startswith("cuda"):
        nvcc = find_nvcc() or install_cuda_wheels(progress)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as tmp:
        work = Path(tmp)
        progress(f"llama-box {version} ({variant}): fetching the llama-cpp-python {version} sdist")
        src = _fetch_source(version, work, progress)
        build_dir = work / "build"
        progress(f"llama-box {version} ({variant}): configuring")
        installs.run(["cmake", "-S", str(src), "-B", str(build_dir), *cmake_flags(variant, nvcc)], progress,
                     what=f"configuring llama.cpp {version}")
        targets = [SERVER_TARGET] + [t for t in [_rpc_target(build_dir)] if t]
        progress(f"llama-box {version} ({variant}): compiling {', '.join(targets)} "
                 f"(minutes; about 5 on 2 cores for the CPU build)")
        installs.run(["cmake", "--build", str(build_dir), "--config", "Release", "-j",
                      str(jobs or os.cpu_count() or 2), "--target", *targets], progress,
                     what=f"building llama.cpp {version}")
        staged = work / "install"
        (staged / "bin").mkdir(parents=True)
        for name in targets:
            shutil.copy2(build_dir / "bin" / name, staged / "bin" / name)
            if shutil.which("strip"):
                subprocess.run(["strip", str(staged / "bin" / name)], check=False)
        installs.mark_installed(staged, version=version, variant=variant, seconds=round(time.monotonic() - started),
                                cmake_flags=cmake_flags(variant, nvcc))
        if target.exists():
            shutil.rmtree(target)
        os.rename(staged, target)  # atomic: a half-built tree is never "found"


def ensure(version: str = "", variant: str = "cpu", progress: Callable[[str], None] = print) -> LlamaBinaries:
    return find(version, variant) or build(version, variant, progress=progress)
