"""WebSocket /ws/instances/{id}/logs: the log's backlog, then new lines as they are written."""

from __future__ import annotations

import asyncio

import redis.asyncio
from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings

from gateway_app.authentication import bearer_token
from gateway_app.models import ApiKey
from models_app.models import ModelInstance
from workers_app import logs

BACKLOG_LINES = 200
POLL_SECONDS = 0.25


@database_sync_to_async
def _user_from_headers(scope) -> object | None:
    headers = {k.decode().lower(): v.decode() for k, v in scope.get("headers", [])}
    token = bearer_token(headers.get("authorization"))
    return ApiKey.user_for(token) if token else None


async def staff_user(scope, *permissions: str):
    """The admin behind a WebSocket handshake (session cookie, or a management API key header) who holds
    `permissions`, or None."""
    user = scope.get("user")
    if user is None or not user.is_authenticated:
        user = await _user_from_headers(scope)
    if user is None or not user.is_staff:
        return None
    return user if await database_sync_to_async(user.has_perms)(permissions) else None


class InstanceLogConsumer(AsyncWebsocketConsumer):
    async def connect(self):
        if await staff_user(self.scope, "models_app.view_modelinstance") is None:
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
        if settings.REDIS_URL:
            await self._follow_stream()
        else:
            await self._follow_file()

    async def _follow_stream(self) -> None:
        """Backlog from the instance's stream, then each new entry as the worker adds it."""
        key = logs.stream_key(self.instance_id)
        conn = redis.asyncio.Redis.from_url(settings.REDIS_URL, decode_responses=True)
        try:
            backlog = await conn.xrevrange(key, count=BACKLOG_LINES)
            last_id = backlog[0][0] if backlog else "0-0"
            for _, fields in reversed(backlog):
                await self.send(text_data=fields.get("line", ""))
            while True:
                for _, entries in await conn.xread({key: last_id}, block=1000, count=500) or []:
                    for entry_id, fields in entries:
                        await self.send(text_data=fields.get("line", ""))
                        last_id = entry_id
        finally:
            await conn.aclose()

    async def _follow_file(self) -> None:
        """Without Redis (one process, no cluster) the log file on this machine is the source."""
        path = settings.DATA_DIR / "logs" / "instances" / f"{self.instance_id}.log"
        position = 0
        first = True
        while True:
            try:
                with open(path, "rb") as f:
                    f.seek(0, 2)
                    if f.tell() < position:  # rotated: start over
                        position = 0
                    f.seek(position)
                    data = f.read()
                    position = f.tell()
            except FileNotFoundError:
                data = b""
            lines = data.decode("utf-8", "replace").splitlines()
            for line in lines[-BACKLOG_LINES:] if first else lines:
                await self.send(text_data=line)
            first = False
            await asyncio.sleep(POLL_SECONDS)
