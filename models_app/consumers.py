"""WebSocket /ws/instances/{id}/logs: the log's backlog, then new lines as they are written."""

from __future__ import annotations

import asyncio

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings

from gateway_app.authentication import bearer_token
from gateway_app.models import ApiKey
from models_app.models import ModelInstance

BACKLOG_LINES = 200
POLL_SECONDS = 0.25


@database_sync_to_async
def _user_from_headers(scope) -> object | None:
    headers = {k.decode().lower(): v.decode() for k, v in scope.get("headers", [])}
    token = bearer_token(headers.get("authorization"))
    return ApiKey.user_for(token) if token else None


class InstanceLogConsumer(AsyncWebsocketConsumer):
    async def connect(self):
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            user = await _user_from_headers(self.scope)
        if user is None or not user.is_staff:
            await self.close(code=4401)
            return
        self.instance_id = self.scope["url_route"]["kwargs"]["instance_id"]
        if not await ModelInstance.objects.filter(pk=self.instance_id).aexists():
            await self.close(code=4404)
            return
        await self.accept()
        self.follower = asyncio.create_task(self._follow())

    async def disconnect(self, code):
        follower = getattr(self, "follower", None)
        if follower is not None:
            follower.cancel()

    async def _follow(self) -> None:
        path = settings.DATA_DIR / "logs" / "instances" / f"{self.instance_id}.log"
        position = 0
        first = True
        while True:
            try:
                with open(path, "rb") as f:
                    f.seek(0, 2)
                    size = f.tell()
                    if size < position:  # rotated or truncated: start over
                        position = 0
                    f.seek(position)
                    data = f.read()
                    position = f.tell()
            except FileNotFoundError:
                data = b""
            if data:
                lines = data.decode("utf-8", "replace").splitlines()
                if first:
                    lines = lines[-BACKLOG_LINES:]
                for line in lines:
                    await self.send(text_data=line)
            first = False
            await asyncio.sleep(POLL_SECONDS)
