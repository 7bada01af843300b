"""Models on a local path: which GGUF file(s) it names, and what format a directory holds.

Shared by the scheduler (estimates) and the workers (what a backend is started on)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from models_app.sources.grouping import is_mmproj, split_info

# The field that names a model's file, per source (a glob for the hubs).
FILE_FIELD = {"local_path": "local_path", "huggingface": "huggingface_filename", "modelscope": "model_scope_file_path"}
# A CTranslate2 conversion of Whisper (what faster-whisper loads): model.bin beside a config.json of its own.
FASTER_WHISPER_KEYS = {"alignment_heads", "lang_ids", "suppress_ids", "suppress_ids_begin"}


def split_gguf_parts(path: str | Path) -> list[Path]:
    """All parts of a split GGUF (`name-00001-of-00003.gguf`), in order, given any one of them; else the file."""
    path = Path(path)
    split = split_info(path.name)
    if split is None:
        return [path]
    stem, _, count = split
    parts = [path.with_name(f"{stem}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]
    return [p for p in parts if p.exists()] or [path]


def gguf_files_under(path: Path) -> list[Path]:
    """The GGUF file(s) a local path names: the file itself, or the model in a directory (no mmproj)."""
    if path.is_file():
        return split_gguf_parts(path)
    candidates = sorted(p for p in path.glob("*.gguf") if p.is_file() and not is_mmproj(p.name))  # no FIFOs
    if not candidates:
        return []
    return split_gguf_parts(candidates[0])


def looks_gguf(fields: Mapping | object) -> bool:
    """What a model's fields (a Model, or the API's dict) say before any file is read: a .gguf file or pattern."""
    def get(name: str) -> str:
        return str((fields.get(name) if isinstance(fields, Mapping) else getattr(fields, name, "")) or "")

    field = FILE_FIELD.get(get("source"))
    return bool(field) and get(field).endswith(".gguf")


def read_config(path: Path) -> dict:
    config = json.loads((path / "config.json").read_text())
    if not isinstance(config, dict):
        raise ValueError("config.json is not a JSON object")
    return config


def is_faster_whisper(path: Path, config: dict) -> bool:
    return (path / "model.bin").is_file() and bool(FASTER_WHISPER_KEYS & set(config)) \
        and not config.get("architectures")


def model_format(path: Path) -> str:
    """"gguf", "hf" (config.json and weights), "faster-whisper", or "" when the path holds none of them. Only
    regular files count: reading a FIFO or a device named like a model would block."""
    if path.is_file():
        return "gguf" if path.suffix == ".gguf" else ""
    if not path.is_dir():
        return ""
    if (path / "config.json").is_file():
        if any(p.is_file() for p in path.glob("*.gguf")):
            return "gguf"
        try:
            config = read_config(path)
        except (OSError, ValueError):
            return "hf"
        return "faster-whisper" if is_faster_whisper(path, config) else "hf"
    return "gguf" if gguf_files_under(path) else ""
