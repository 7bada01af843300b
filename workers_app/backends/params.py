"""Backend parameters as users write them: `--p=v`, `--flag`, or `--p` followed by `v`."""

from __future__ import annotations


def flag_names(params: list[str]) -> set[str]:
    return {p.split("=", 1)[0] for p in params if p.startswith("-") and not _is_number(p)}


def as_separate_arguments(params: list[str]) -> list[str]:
    """`--p=v` as `--p`, `v`: llama.cpp's parser (and some others) take only the separate form."""
    out = []
    for item in params:
        if item.startswith("--") and "=" in item:
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


def validate_parameters(params: list, reserved: frozenset[str]) -> list[str]:
    """Problems with a parameter list, as messages; empty when it is fine."""
    problems = []
    for item in params:
        if not isinstance(item, str) or not item:
            problems.append(f"{item!r} is not a non-empty string")
    if problems:
        return problems
    for name in sorted(flag_names(params) & reserved):
        problems.append(f"{name} is set by aiMindServe and cannot be overridden")
    if params and not params[0].startswith("-"):
        problems.append(f"{params[0]!r} must follow a flag such as --ctx-size")
    return problems
