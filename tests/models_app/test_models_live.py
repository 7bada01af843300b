"""/ws/models keeps the Models page current: it sends the rows of each model that changed since the page was
rendered (as the page's template renders them, in the reader's language), and says when a model is gone."""

import json

import pytest
from asgiref.sync import async_to_sync, sync_to_async
from asgiref.testing import ApplicationCommunicator
from django.test import Client

from aimind.asgi import application
from models_app import actions
from models_app.live import snapshot
from models_app.models import Model, ModelInstance

pytestmark = pytest.mark.django_db(transaction=True)  # the consumer reads the database from its own thread


class Socket(ApplicationCommunicator):
    """A WebSocket client speaking ASGI to the application (channels' own helper needs daphne)."""

    def __init__(self, path: str, headers=()):
        super().__init__(application, {"type": "websocket", "path": path, "raw_path": path.encode(),
                                       "query_string": b"", "headers": list(headers), "subprotocols": []})

    async def connect(self) -> tuple[bool, int | None]:
        await self.send_input({"type": "websocket.connect"})
        answer = await self.receive_output(5)
        return answer["type"] == "websocket.accept", answer.get("code")

    async def send_to(self, text_data: str) -> None:
        await self.send_input({"type": "websocket.receive", "text": text_data})

    async def receive_from(self, timeout: float) -> str:
        return (await self.receive_output(timeout))["text"]

    async def disconnect(self) -> None:
        await self.send_input({"type": "websocket.disconnect", "code": 1000})
        await self.wait(1)


def session_headers(user, language="en") -> list[tuple[bytes, bytes]]:
    client = Client()
    client.force_login(user)
    cookie = f"sessionid={client.cookies['sessionid'].value}; django_language={language}; csrftoken={'c' * 32}"
    return [(b"cookie", cookie.encode()), (b"origin", b"http://testserver"), (b"host", b"testserver")]


def test_changed_models_arrive_rendered_and_deleted_ones_are_named(admin_user):
    quiet = actions.do_create_model(name="quiet", source="local_path", local_path="/q.gguf")
    busy = actions.do_create_model(name="busy", source="local_path", local_path="/b.gguf")
    shown = snapshot()  # what the page was rendered with
    ModelInstance.objects.filter(model=busy).update(state="downloading", download_progress=42)
    headers = session_headers(admin_user, "zh-hans")

    async def conversation():
        socket = Socket("/ws/models", headers=headers)
        connected, _ = await socket.connect()
        assert connected
        await socket.send_to(text_data=json.dumps({"shown": shown}))
        first = json.loads(await socket.receive_from(timeout=5))
        await socket.send_to(text_data=json.dumps({"shown": {}}))  # a second hello is ignored
        await sync_to_async(Model.objects.filter(pk=quiet.pk).delete)()
        second = json.loads(await socket.receive_from(timeout=5))
        assert await socket.receive_nothing(timeout=1.2)
        await socket.disconnect()
        return first, second

    first, second = async_to_sync(conversation)()
    assert (first["type"], first["id"]) == ("model", busy.pk)
    assert "下载中 42%" in first["html"]  # the reader's language
    assert f'name="csrfmiddlewaretoken" value="{"c" * 32}"' in first["html"]  # its buttons still post
    assert second == {"type": "removed", "id": quiet.pk}


def test_a_page_of_another_origin_is_refused_even_with_the_admins_cookie(admin_user):
    headers = [h for h in session_headers(admin_user) if h[0] != b"origin"] + [(b"origin", b"http://evil:9999")]

    async def conversation():
        return await Socket("/ws/models", headers=headers).connect()

    assert async_to_sync(conversation)() == (False, 4403)


def test_only_admins_may_listen():
    async def conversation():
        socket = Socket("/ws/models")
        connected, code = await socket.connect()
        return connected, code

    assert async_to_sync(conversation)() == (False, 4401)
