"""The /v1 routes through Django's own handler (`runserver`, the test client): the same gateway app
(gateway_app.proxy), its answer collected whole. Under uvicorn, aimind.asgi hands /v1/ to that app directly."""

from __future__ import annotations

import asyncio

from django.http import HttpRequest, HttpResponse
from django.views.decorators.csrf import csrf_exempt

from gateway_app.proxy import Gateway


async def _not_routed(scope, receive, send) -> None:
    raise AssertionError(f"{scope['path']} is no gateway route")


_gateway = Gateway(_not_routed)


@csrf_exempt
async def gateway(request: HttpRequest, route: str = "models") -> HttpResponse:
    scope = {"type": "http", "method": request.method, "path": request.path, "query_string": b"",
             "headers": [(name.lower().encode("latin-1"), value.encode("latin-1"))
                         for name, value in request.headers.items()]}
    body = request.body
    answered: dict = {"status": 500, "headers": [], "body": []}
    delivered = False

    async def receive() -> dict:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # this client never leaves early: the gateway stops waiting for it itself

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            answered["status"], answered["headers"] = message["status"], message.get("headers", [])
        else:
            answered["body"].append(message.get("body", b""))

    await _gateway(scope, receive, send)
    response = HttpResponse(b"".join(answered["body"]), status=answered["status"])
    for name, value in answered["headers"]:
        if name != b"content-length":
            response[name.decode("latin-1")] = value.decode("latin-1")
    return response
