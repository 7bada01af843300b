import multiprocessing
import os
import sys

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "aimind.settings")
django_asgi_app = get_asgi_application()

from channels.auth import AuthMiddlewareStack  # noqa: E402  (needs Django set up first)
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler  # noqa: E402

from aimind.supervisor import die_with_parent  # noqa: E402
from gateway_app.proxy import Gateway, lifespan  # noqa: E402
from models_app.routing import websocket_urlpatterns  # noqa: E402

# A worker process of `uvicorn --workers` ends with its manager (killed outright, it would leave them holding the
# port, and the restarted web server could not listen).
_manager = multiprocessing.parent_process()
if _manager is not None:
    die_with_parent()
    if os.getppid() != _manager.pid:
        sys.exit("the web server's manager process is gone")


class SameOriginWebSocket:
    """A browser sends the session cookie with a WebSocket handshake from any page of the same host, another port
    included: a handshake whose Origin is not this server is refused. Clients that send no Origin (an API key
    client, a script) are judged by their credentials alone."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        headers = dict(scope.get("headers") or [])
        origin = headers.get(b"origin", b"").decode("latin-1")
        if origin and origin.split("://", 1)[-1].rstrip("/") != headers.get(b"host", b"").decode("latin-1"):
            await send({"type": "websocket.close", "code": 4403})
            return
        await self.app(scope, receive, send)


class BodyLimit:
    """Request bodies are refused by size (413) before Django reads (and spools) them: at most
    AIMIND_MAX_REQUEST_BYTES, and 64 KiB for a request that carries no credential at all (enough to sign in)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        from django.conf import settings

        headers = dict(scope.get("headers") or [])
        credentialed = b"authorization" in headers or b"sessionid=" in headers.get(b"cookie", b"")
        limit = settings.MAX_REQUEST_BYTES if credentialed else settings.MAX_ANONYMOUS_REQUEST_BYTES
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            return await _too_large(send, limit)
        seen = 0
        refused = False

        async def counted_receive():
            nonlocal seen, refused
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit and not refused:  # a chunked body that grows past the limit: end it here
                    refused = True
                    await _too_large(send, limit)
                    return {"type": "http.disconnect"}
            return message

        await self.app(scope, counted_receive, send)


async def _too_large(send, limit: int) -> None:
    body = (b'{"detail": "the request body is larger than %d bytes", "error": {"message": "the request body is '
            b'larger than %d bytes", "type": "invalid_request_error", "code": "request_too_large"}}' % (limit, limit))
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


application = ProtocolTypeRouter({
    # /v1/ goes straight to the gateway (its keys and routes in memory, none of Django's request machinery);
    # the admin's CSS/JS are served by the app itself: `up` is one process tree, no separate web server.
    "http": BodyLimit(Gateway(ASGIStaticFilesHandler(django_asgi_app))),
    "websocket": SameOriginWebSocket(AuthMiddlewareStack(URLRouter(websocket_urlpatterns))),
    "lifespan": lifespan,
})
