"""The small interface every inference backend implements, and the registry that finds them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

ERROR_WORDS = ("error", "failed", "invalid", "abort", "exception", "traceback", "cannot", "unable", "not found",
               "out of memory")


class BackendError(Exception):
    """A launch failed. `permanent` means retrying cannot help (bad arguments, missing file)."""

    def __init__(self, message: str, *, permanent: bool = False):
        super().__init__(message)
        self.permanent = permanent


@dataclass
class LaunchSpec:
    model_name: str
    model_path: Path
    host: str
    port: int
    categories: list[str]
    gpu_indexes: list[int]
    claim: dict
    backend_parameters: list[str] = field(default_factory=list)
    backend_version: str = ""
    env: dict[str, str] = field(default_factory=dict)


class Backend:
    name: str = ""
    health_path: str = "/health"
    # Flags aiMindServe sets itself; a user passing them would break routing.
    reserved_flags: frozenset[str] = frozenset()

    def ensure_installed(self, version: str = "") -> None:
        """Make the backend runnable on this worker (build, install or find it)."""
        raise NotImplementedError

    def resolve_model_path(self, path: Path) -> Path:
        return path

    def command(self, spec: LaunchSpec) -> list[str]:
        raise NotImplementedError

    def environment(self, spec: LaunchSpec) -> dict[str, str]:
        visible = ",".join(str(i) for i in spec.gpu_indexes)
        return {"CUDA_VISIBLE_DEVICES": visible, **{k: str(v) for k, v in spec.env.items()}}

    def error_from_log(self, lines: list[str]) -> str:
        """The last line of a failed run's log that reads like a cause; empty when none does (a kill -9
        leaves only ordinary lines, and quoting one of them would mislead)."""
        for line in reversed([line.strip() for line in lines if line.strip()]):
            lowered = line.lower()
            if any(word in lowered for word in ERROR_WORDS):
                return line
        return ""


_REGISTRY: dict[str, Backend] = {}


def register(backend: Backend) -> Backend:
    _REGISTRY[backend.name] = backend
    return backend


def get_backend(name: str) -> Backend:
    from workers_app.backends import llama_box  # noqa: F401  (registers itself)

    try:
        return _REGISTRY[name]
    except KeyError:
        raise BackendError(f"backend {name!r} is not available on this worker", permanent=True) from None
