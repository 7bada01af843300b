"""The backends registry. Each backend is one module here; the API's choices and parameter checks, the
scheduler's pipelines and the node agent's launches all come from it."""

from __future__ import annotations

from workers_app.backends import llama_box, vllm, vox_box  # noqa: F401  (each registers itself)
from workers_app.backends.base import Backend, BackendError, registered


def all_backends() -> list[Backend]:
    return list(registered().values())


def names() -> list[str]:
    return list(registered())


def get_backend(name: str) -> Backend:
    try:
        return registered()[name]
    except KeyError:
        raise BackendError(f"backend {name!r} is unknown (one of {', '.join(registered())})", permanent=True) \
            from None


def choose_backend(model_format: str, categories: list[str]) -> str:
    """The backend for a model whose user left it empty: the first that serves this format and is meant for one
    of its categories, else the first that serves the format."""
    serving = [b for b in all_backends() if model_format in b.formats]
    for backend in serving:
        if backend.categories & set(categories):
            return backend.name
    if serving:
        return serving[0].name
    raise BackendError(f"no backend serves {model_format} models", permanent=True)


def backends_checked_for(backend: str, looks_gguf: bool) -> list[Backend]:
    """Which backends' rules a model's parameters and env must follow: its own, or when it is left empty, the one
    a GGUF file gets, else every backend that could be chosen."""
    if backend:
        return [get_backend(backend)]
    if looks_gguf:
        return [get_backend(choose_backend("gguf", ["llm"]))]
    return [b for b in all_backends() if b.formats - {"gguf"}]
