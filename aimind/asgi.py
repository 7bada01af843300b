import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "aimind.settings")
django_asgi_app = get_asgi_application()

from channels.auth import AuthMiddlewareStack  # noqa: E402  (needs Django set up first)
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler  # noqa: E402

from models_app.routing import websocket_urlpatterns  # noqa: E402


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


application = ProtocolTypeRouter({
    # The admin's CSS/JS are served by the app itself: `up` is one process tree, no separate web server.
    "http": ASGIStaticFilesHandler(django_asgi_app),
    "websocket": SameOriginWebSocket(AuthMiddlewareStack(URLRouter(websocket_urlpatterns))),
})
