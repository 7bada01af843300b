"""Backend parameters as users write them: `--p=v`, `--flag`, or `--p` followed by `v`."""

from __future__ import annotations


def flag_names(params: list[str]) -> set[str]:
    return {p.split("=", 1)[0] for p in params if p.startswith("-") and not _is_number(p)}


def as_separate_arguments(params: list[str]) -> list[str]:
    """`--p=v` (or `-p=v`) as `--p`, `v`: llama.cpp's parser (and some others) take only the separate form."""
    out = []
    for item in params:
        if item.startswith("-") and "=" in item and not _is_number(item.partition("=")[0]):
            flag, _, value = item.partition("=")
            out += [flag, value]
        else:
            out.append(item)
    return out


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
