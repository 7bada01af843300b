"""Memory sizes as people write them (`8GiB`, `512MiB`, `1.5G`, a number of bytes) and as they read them."""

from __future__ import annotations

import re

SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
UNITS = {"": 1, "B": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def parse_size(text: str) -> int:
    """`8GiB`, `512MiB`, `1.5G` or a number of bytes (units are powers of 1024)."""
    match = SIZE.match(text or "")
    if not match:
        raise ValueError(f"{text!r} is not a size (e.g. 8GiB, 512MiB or a number of bytes)")
    unit = (match[2] or "").upper()[:1]
    return int(float(match[1]) * UNITS[unit])


def format_size(n: int) -> str:
    """The shortest exact-enough form that `parse_size` reads back: `4GiB`, `1.5GiB`, `512MiB`, `0`."""
    if not n:
        return "0"
    for unit, factor in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= factor:
            value = n / factor
            text = f"{value:.2f}".rstrip("0").rstrip(".")
            return f"{text}{unit}"
    return str(n)
