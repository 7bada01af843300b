"""What a worker needs to join: the cluster token (from AIMIND_TOKEN or generated once in the data dir), its own
credential afterwards, and the broker address it learns from its registration."""

from __future__ import annotations

import hmac
import os
import secrets
from functools import cache
from urllib.parse import urlsplit, urlunsplit

from django.conf import settings

CREDENTIAL_HEADER = "X-Worker-Credential"
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


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


def broker_url_for(server_host: str) -> str:
    """The Redis a worker that reached this server at `server_host` should use: REDIS_URL, with a loopback host
    replaced by `server_host` (the embedded Redis listens where the web server does)."""
    url = settings.REDIS_URL
    if not url:
        return ""
    parts = urlsplit(url)
    if parts.hostname not in LOOPBACK or server_host in LOOPBACK or not server_host:
        return url
    auth = parts.netloc.rpartition("@")[0]
    host = f"[{server_host}]" if ":" in server_host else server_host
    netloc = (auth + "@" if auth else "") + host + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
