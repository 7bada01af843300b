"""WebSocket /ws/models: the Models page stays current without reloading. The page carries a fingerprint of what
each model's rows showed when it was rendered and sends them when the socket opens; from then on, every half
second, the consumer compares the fingerprints of the database (states, progress, messages, restarts …) with what
the page has, and pushes the re-rendered rows of each model that changed (by the page's own template, in the
reader's language), or says that a model is gone. Any writer of any process is seen: no event has to be kept."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings
from django.template.defaultfilters import filesizeformat
from django.template.loader import render_to_string
from django.utils import translation
from django.utils.translation.trans_real import get_supported_language_variant, parse_accept_lang_header

from models_app.consumers import staff_user
from models_app.models import Model, ModelInstance, claimed_total, measured_total

logger = logging.getLogger(__name__)
POLL_SECONDS = 0.5
FAILURES_BEFORE_CLOSING = 5  # then the page reconnects (and shows that it is not live meanwhile)
_SHOWN = ("state", "state_message", "download_progress", "restart_count", "next_restart_at", "port", "worker_id",
          "gpu_indexes", "config_version", "error_kind", "name")


def memory_shown(measured: dict | None, claim: dict | None) -> tuple:
    """What an instance's row shows of its memory (the over-claim badge, used / claimed as the page rounds them):
    the digest changes when the text does, not with every byte a heartbeat measures (sizes are written as in
    English, whatever the caller's language: the digest must not depend on it)."""
    used, claimed = measured_total(measured), claimed_total(claim)
    return ((measured or {}).get("over_claim") or "", None if used is None else filesizeformat(used),
            None if claimed is None else filesizeformat(claimed))


def snapshot() -> dict[int, str]:
    """{model id: a digest of everything its rows show} (stable across processes: the page and the socket may be
    served by different ones)."""
    shown: dict[int, list] = {pk: list(rest) for pk, *rest in Model.objects.values_list(
        "id", "name", "replicas", "updated_at", "config_version", "description", "asleep")}
    rows = ModelInstance.objects.order_by("id").values_list("model_id", "id", *_SHOWN, "measured",
                                                             "computed_resource_claim")
    with translation.override("en"):
        for row in rows:
            if row[0] in shown:
                *plain, measured, claim = row[1:]
                shown[row[0]].append((*plain, memory_shown(measured, claim)))
    return {pk: hashlib.sha1(repr(rows).encode()).hexdigest()[:16] for pk, rows in shown.items()}


def render_model(model_id: int, fingerprint: str, language: str, csrf_token: str) -> str | None:
    from models_app.views import model_row_context, models_with_instances

    model = models_with_instances().filter(pk=model_id).first()
    if model is None:
        return None
    with translation.override(language):
        return render_to_string("models/_model.html", {**model_row_context(model), "csrf_token": csrf_token,
                                                       "fingerprint": fingerprint})


def scope_language(scope) -> str:
    """The page's language: the switch's cookie, else the browser's Accept-Language, else the default."""
    headers = {k.decode().lower(): v.decode() for k, v in scope.get("headers", [])}
    cookies = scope.get("cookies") or {}  # parsed by Channels as Django parses them (tolerant of odd cookies)
    wanted = [cookies[settings.LANGUAGE_COOKIE_NAME]] if settings.LANGUAGE_COOKIE_NAME in cookies else []
    wanted += [code for code, _ in parse_accept_lang_header(headers.get("accept-language", ""))]
    for code in wanted:
        try:
            return get_supported_language_variant(code)
        except LookupError:
            continue
    return settings.LANGUAGE_CODE


def scope_csrf(scope) -> str:
    return (scope.get("cookies") or {}).get(settings.CSRF_COOKIE_NAME, "")


class ModelsLiveConsumer(AsyncWebsocketConsumer):
    async def connect(self):
        if await staff_user(self.scope, "models_app.view_model", "models_app.view_modelinstance") is None:
            await self.close(code=4401)
            return
        self.language = scope_language(self.scope)
        self.csrf = scope_csrf(self.scope)
        self.watcher = None
        await self.accept()

    async def receive(self, text_data=None, bytes_data=None):
        """The page's first message: {"shown": {model id: fingerprint}}, what it was rendered with."""
        if self.watcher is not None:
            return
        try:
            shown = json.loads(text_data or "{}").get("shown") or {}
            seen = {int(pk): str(fingerprint) for pk, fingerprint in shown.items()}
        except (ValueError, TypeError, AttributeError):
            seen = {}  # then every model is sent once
        self.watcher = asyncio.create_task(self._watch(seen))

    async def disconnect(self, code):
        if getattr(self, "watcher", None) is not None:
            self.watcher.cancel()

    async def _watch(self, seen: dict[int, str]) -> None:
        failures = 0
        while True:
            try:
                seen = await self._push_changes(seen)
                failures = 0
            except asyncio.CancelledError:
                raise
            except Exception:  # a dropped database connection, say: try again, then let the page reconnect
                failures += 1
                logger.exception("live models: a pass failed (%s in a row)", failures)
                if failures >= FAILURES_BEFORE_CLOSING:
                    await self.close(code=1011)
                    return
            await asyncio.sleep(POLL_SECONDS)

    async def _push_changes(self, seen: dict[int, str]) -> dict[int, str]:
        now = await database_sync_to_async(snapshot)()
        for model_id in sorted(set(seen) - set(now)):
            await self.send(text_data=json.dumps({"type": "removed", "id": model_id}))
        for model_id in sorted(pk for pk, fingerprint in now.items() if seen.get(pk) != fingerprint):
            html = await database_sync_to_async(render_model)(model_id, now[model_id], self.language, self.csrf)
            if html is not None:
                await self.send(text_data=json.dumps({"type": "model", "id": model_id, "html": html}))
        return now
