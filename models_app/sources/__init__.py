"""Model hubs (Hugging Face, ModelScope): search, file listings grouped by quantization, direct range-capable URLs
and the worker's downloads through each hub's own client. Endpoints come from the environment at call time:
HF_ENDPOINT (default https://huggingface.co), MODELSCOPE_ENDPOINT (default https://www.modelscope.cn), HF_TOKEN."""

from __future__ import annotations

from models_app.choices import SourceChoices
from models_app.sources.base import FileEntry, Source, SourceError
from models_app.sources.grouping import group_files, match_files, model_ggufs, parse_quantization, split_info
from models_app.sources.rangefile import RangeFile

__all__ = ["HUBS", "FileEntry", "RangeFile", "Source", "SourceError", "get_source", "group_files", "hub_spec",
           "match_files", "model_ggufs", "parse_quantization", "split_info"]

HUBS = ("huggingface", "modelscope")


def get_source(hub: str) -> Source:
    """The source for a hub name; the client libraries are imported on first use."""
    if hub == "huggingface":
        from models_app.sources.huggingface import HuggingFaceSource

        return HuggingFaceSource()
    if hub == "modelscope":
        from models_app.sources.modelscope import ModelScopeSource

        return ModelScopeSource()
    raise ValueError(f"unknown hub {hub!r} (one of {', '.join(HUBS)})")


def hub_spec(model) -> tuple[str, str, str]:
    """(hub, repo, file pattern) of a model from a hub; an empty pattern means the whole repo (HF format)."""
    if model.source == SourceChoices.HUGGINGFACE:
        return "huggingface", model.huggingface_repo_id, model.huggingface_filename
    if model.source == SourceChoices.MODELSCOPE:
        return "modelscope", model.model_scope_model_id, model.model_scope_file_path
    raise ValueError(f"{model.source} is not a hub source")
