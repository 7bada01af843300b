"""How a worker node talks to the server: join, heartbeat, read its assignments, report what happened.

A worker node has no database: everything it learns and tells goes through the server's API with the cluster token
and the worker's own credential (issued at its first registration, kept in `<data dir>/worker-credential`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from models_app.models import Model
from workers_app.cluster import CREDENTIAL_HEADER

logger = logging.getLogger(__name__)
MODEL_FIELDS = {f.name for f in Model._meta.concrete_fields}


class ServerUnreachable(Exception):
    """The server did not answer (or answered 5xx); what was asked may be asked again later."""


class NameTaken(Exception):
    """Another live worker holds this name (409): this node cannot join under it."""


@dataclass
class Assignment:
    """One instance as the server holds it, for this worker: its main backend, or one of its RPC parts."""

    pk: int
    name: str
    state: str
    role: str  # "main": the backend runs here; "subordinate": RPC servers of it run here
    worker_name: str
    model: Model  # never saved: its fields, for downloads and the command line
    pid: int | None = None
    port: int | None = None
    gpu_indexes: list[int] = field(default_factory=list)
    computed_resource_claim: dict = field(default_factory=dict)
    distributed_servers: list[dict] = field(default_factory=list)
    backend: str = ""
    backend_version: str = ""
    backend_api_key: str = ""
    restart_count: int = 0
    restart_due: bool = False
    state_message: str = ""
    main_host: str = ""  # the main worker's address (a vLLM node dials it)

    @classmethod
    def from_api(cls, data: dict) -> Assignment:
        model = Model(**{k: v for k, v in data["model"].items() if k in MODEL_FIELDS})
        return cls(pk=data["id"], name=data["name"], state=data["state"], role=data["role"],
                   worker_name=data.get("worker_name") or "", model=model, pid=data.get("pid"),
                   port=data.get("port"), gpu_indexes=list(data.get("gpu_indexes") or []),
                   computed_resource_claim=dict(data.get("computed_resource_claim") or {}),
                   distributed_servers=list(data.get("distributed_servers") or []),
                   backend=data.get("backend") or "", backend_version=data.get("backend_version") or "",
                   backend_api_key=data.get("backend_api_key") or "", restart_count=data.get("restart_count") or 0,
                   restart_due=bool(data.get("restart_due")), state_message=data.get("state_message") or "",
                   main_host=data.get("main_host") or "")

    def parts_on(self, worker_id: int) -> list[tuple[int, dict]]:
        return [(n, p) for n, p in enumerate(self.distributed_servers) if p.get("worker_id") == worker_id]


class ServerLink:
    """`server_url`: the server's base URL, or several separated by commas (servers running side by side on one
    database): a call that cannot connect to one, or gets a 5xx from it, is asked of the next, which is kept from then
    on."""

    def __init__(self, server_url: str, token: str, credential_path: Path, timeout: float = 5.0,
                 transport: httpx.BaseTransport | None = None):
        self.server_urls = [url.strip().rstrip("/") for url in server_url.split(",") if url.strip()]
        self.server_url = self.server_urls[0]
        self.credential_path = credential_path
        self.worker_id: int | None = None
        self.http = httpx.Client(timeout=timeout, headers={"Authorization": f"Bearer {token}"}, transport=transport)

    def close(self) -> None:
        self.http.close()

    def _credential_headers(self) -> dict[str, str]:
        try:
            return {CREDENTIAL_HEADER: self.credential_path.read_text().strip()}
        except OSError:
            return {}

    def _call(self, method: str, path: str, **kwargs) -> httpx.Response:
        problems = []
        for url in [self.server_url, *(u for u in self.server_urls if u != self.server_url)]:
            try:
                response = self.http.request(method, f"{url}{path}", headers=self._credential_headers(), **kwargs)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:  # never sent: the next server may take it
                problems.append(f"{url}: {exc}")
                continue
            except httpx.HTTPError as exc:  # perhaps received: not sent twice (the caller asks again later)
                raise ServerUnreachable("; ".join([*problems, f"{url}: {exc}"])) from exc
            if response.status_code >= 500:
                problems.append(f"{url}{path} answered {response.status_code}")
                continue
            if url != self.server_url:
                logger.warning("server %s failed (%s); talking to %s from now on", self.server_url, problems[0], url)
                self.server_url = url
            return response
        raise ServerUnreachable("; ".join(problems))

    def register(self, body: dict) -> dict:
        """Join (or join again); keeps the credential the server issues. Returns the server's answer."""
        response = self._call("POST", "/api/v1/workers", json=body)
        if response.status_code == 409:
            raise NameTaken(response.json().get("detail", "name taken"))
        if response.status_code in (401, 403):
            raise PermissionError(f"the server refused to register this worker ({response.status_code}): "
                                  f"{response.json().get('detail', '')} — check AIMIND_TOKEN")
        response.raise_for_status()
        answer = response.json()
        if answer.get("credential"):  # ours from now on: it proves this worker is the one that joined
            self.credential_path.parent.mkdir(parents=True, exist_ok=True)
            self.credential_path.touch(mode=0o600)
            self.credential_path.chmod(0o600)
            self.credential_path.write_text(answer["credential"])
        self.worker_id = answer["id"]
        return answer

    def heartbeat(self, status: dict, measured: dict | None = None) -> bool:
        """False when the server no longer knows this worker (deleted, or our credential is not its): join again.
        `measured`: what each backend really uses (workers_app.measure), by instance id."""
        body = {"status": status, **({"measured": measured} if measured else {})}
        response = self._call("POST", f"/api/v1/workers/{self.worker_id}/heartbeat", json=body)
        if response.status_code in (403, 404):
            return False
        response.raise_for_status()
        return True

    def assignments(self, instance_id: int | None = None) -> list[Assignment]:
        params = {"instance": instance_id} if instance_id is not None else None
        response = self._call("GET", f"/api/v1/workers/{self.worker_id}/assignments", params=params)
        if response.status_code in (403, 404):
            raise ServerUnreachable(f"the server does not know worker {self.worker_id} now ({response.status_code})")
        response.raise_for_status()
        return [Assignment.from_api(item) for item in response.json()["instances"]]

    def assignment(self, instance_id: int) -> Assignment | None:
        found = self.assignments(instance_id)
        return found[0] if found else None

    def report(self, event: str, instance_id: int | None = None, **data) -> tuple[bool, Assignment | None]:
        """Tell the server what happened. Returns whether it applied, and the instance as the server now holds it
        (None when it is gone or no longer this worker's)."""
        body = {"event": event, **data}
        if instance_id is not None:
            body["instance"] = instance_id
        response = self._call("POST", f"/api/v1/workers/{self.worker_id}/reports", json=body)
        if response.status_code in (403, 404):
            raise ServerUnreachable(f"the server does not know worker {self.worker_id} now ({response.status_code})")
        if response.status_code == 400:
            logger.error("the server refused report %s: %s", body, response.text[:500])
            return False, None
        response.raise_for_status()
        answer = response.json()
        current = answer.get("instance")
        return bool(answer.get("applied")), Assignment.from_api(current) if current else None
