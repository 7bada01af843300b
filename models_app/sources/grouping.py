"""GGUF files of a repo by quantization: names parsed, split sets (-00001-of-00003.gguf) joined, mmproj marked."""

from __future__ import annotations

import fnmatch
import posixpath
import re

from models_app.sources.base import FileEntry

SPLIT_RE = re.compile(r"^(?P<stem>.*)-(?P<index>\d{5})-of-(?P<count>\d{5})\.gguf$", re.IGNORECASE)
# Q4_K_M, Q8_0, Q4_0_4_4, IQ2_XXS, IQ4_NL, Q4_K_XL (unsloth UD-), TQ1_0, F16/FP16, BF16, F32, MXFP4(_MOE)
_QUANT = r"(?:I?Q[1-8](?:_(?:K|M|S|L|XL|XS|XXS|NL|[0-9]))*|TQ[12]_0|F(?:P)?16|BF16|F(?:P)?32|MXFP4(?:_MOE)?)"
_TOKEN_RE = re.compile(rf"^{_QUANT}$", re.IGNORECASE)
_EMBEDDED_RE = re.compile(rf"(?<![A-Za-z0-9]){_QUANT}(?![A-Za-z0-9])", re.IGNORECASE)


def split_info(path: str) -> tuple[str, int, int] | None:
    """(path without the part suffix, part index, part count) of a split GGUF part, else None."""
    match = SPLIT_RE.match(path)
    return (match["stem"], int(match["index"]), int(match["count"])) if match else None


def is_mmproj(path: str) -> bool:
    return "mmproj" in posixpath.basename(path).lower()


def model_ggufs(files: list[FileEntry]) -> list[FileEntry]:
    """The model's own GGUF files (every part of a split set; no multimodal projector), by path."""
    return sorted((f for f in files if f.path.lower().endswith(".gguf") and not is_mmproj(f.path)),
                  key=lambda f: f.path)


def _normalise(token: str) -> str:
    token = token.upper()
    return {"FP16": "F16", "FP32": "F32"}.get(token, token)


def parse_quantization(filename: str) -> str | None:
    """The quantization a GGUF file name carries (`Q4_K_M`, `IQ2_XS`, `BF16`…), else None.

    The file name decides; a folder name (`Q4_K_M/model-00001-of-00002.gguf`) is the fallback."""
    names = [posixpath.basename(filename)] + list(reversed(posixpath.dirname(filename).split("/")))
    for i, name in enumerate(names):
        if not name:
            continue
        if i == 0:
            info = split_info(name)
            name = info[0] if info else re.sub(r"\.gguf$", "", name, flags=re.IGNORECASE)
        tokens = [t for t in re.split(r"[-.\s]", name) if _TOKEN_RE.match(t)]
        if tokens:
            return _normalise(tokens[-1])  # the last one: `Llama-3.1-8B-Q4_K_M` names the model first
        found = _EMBEDDED_RE.findall(name)  # `ggml-model_q4_0`: separated by underscores only
        if found:
            return _normalise(found[-1])
    return None


def group_files(files: list[FileEntry]) -> dict:
    """{"gguf": [{"quantization", "files", "size", "split", "mmproj", "path", "parts"}], "other": [{"path", "size"}]}.

    One entry per logical GGUF file: the parts of a split set are one entry with their total size."""
    sets: dict[str, list[FileEntry]] = {}
    counts: dict[str, int] = {}
    other = []
    for entry in sorted(files, key=lambda f: f.path):
        if not entry.path.lower().endswith(".gguf"):
            other.append({"path": entry.path, "size": entry.size})
            continue
        info = split_info(entry.path)
        key = f"{info[0]}\0{info[2]}" if info else entry.path
        sets.setdefault(key, []).append(entry)
        counts[key] = info[2] if info else 1
    gguf = []
    for key, parts in sets.items():
        first = parts[0].path
        gguf.append({
            "quantization": parse_quantization(first),
            "files": [p.path for p in parts],
            "path": first,
            "size": sum(p.size for p in parts),
            "split": split_info(first) is not None,
            "parts": counts[key],
            "complete": len(parts) == counts[key],
            "mmproj": is_mmproj(first),
        })
    gguf.sort(key=lambda g: (g["mmproj"], g["size"], g["path"]))  # models by size, projectors last
    return {"gguf": gguf, "other": other}


def match_files(files: list[FileEntry], pattern: str) -> list[FileEntry]:
    """Files whose path (or, for a pattern without '/', whose name) matches the glob, ignoring case; a matched part
    of a split GGUF brings all its parts along."""

    glob = pattern.lower()  # case-insensitive: people type `q4_k_m` for `Q4_K_M`

    def matches(path: str) -> bool:
        path = path.lower()
        return fnmatch.fnmatchcase(path, glob) or ("/" not in glob and
                                                   fnmatch.fnmatchcase(posixpath.basename(path), glob))

    picked = {f.path: f for f in files if matches(f.path)}
    wanted_sets = {(info[0], info[2]) for info in map(split_info, picked) if info}
    for f in files:
        info = split_info(f.path)
        if info and (info[0], info[2]) in wanted_sets:
            picked[f.path] = f
    return sorted(picked.values(), key=lambda f: f.path)
