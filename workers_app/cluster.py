"""The cluster token that workers present to join; from AIMIND_TOKEN or generated once in the data dir."""

from __future__ import annotations

import hmac
import os
import secrets
from functools import cache

from django.conf import settings


@cache
def cluster_token() -> str:
    explicit = os.environ.get("AIMIND_TOKEN", "").strip()
    if explicit:
        return explicit
    path = settings.DATA_DIR / "token"
    if not path.exists():
        settings.DATA_DIR.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(24))
    return path.read_text().strip()


def is_cluster_token(candidate: str | None) -> bool:
    return bool(candidate) and hmac.compare_digest(candidate, cluster_token())
