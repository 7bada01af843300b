"""The OpenAI-compatible /v1 routes: authenticate, pick a running instance, pass the request through."""

from __future__ import annotations

import asyncio
import json
import logging
import time

import httpx
from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.utils import timezone
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_POST

from gateway_app.authentication import bearer_token
from gateway_app.models import ApiKey, hash_key
from gateway_app.routing import NoRunningInstance, UnknownModel, pick_upstream
from models_app.choices import InstanceState
from models_app.models import Model

logger = logging.getLogger(__name__)

# Headers that describe one hop, not the message; never passed through.
_HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding", "host",
                "authorization", "upgrade", "te", "trailer", "proxy-authorization", "proxy-authenticate"}
_clients: dict[int, httpx.AsyncClient] = {}
JSON_ROUTES = frozenset({"chat/completions", "completions", "embeddings", "rerank", "audio/speech"})


def _client() -> httpx.AsyncClient:
    """One pooled client per event loop (uvicorn runs one)."""
    loop_id = id(asyncio.get_running_loop())
    client = _clients.get(loop_id)
    if client is None:
        client = httpx.AsyncClient(timeout=httpx.Timeout(connect=5.0, read=600.0, write=60.0, pool=10.0),
                                   limits=httpx.Limits(max_connections=1000, max_keepalive_connections=100))
        _clients[loop_id] = client
    return client


def openai_error(status: int, message: str, type_: str, code: str | None = None) -> JsonResponse:
    return JsonResponse({"error": {"message": message, "type": type_, "code": code}}, status=status)


LAST_USED_FLUSH_SECONDS = 30.0  # `last_used_at` is written in batches, off the request path
_last_used: dict[int, object] = {}
_last_flush = [0.0]


async def _authenticated(request: HttpRequest) -> bool:
    token = bearer_token(request.headers.get("Authorization"))
    if token is None:
        return False
    key = await ApiKey.objects.select_related("user").filter(key_hash=hash_key(token)).afirst()
    if key is None or not key.usable():
        return False
    _last_used[key.pk] = timezone.now()
    now = time.monotonic()
    if now - _last_flush[0] >= LAST_USED_FLUSH_SECONDS:
        _last_flush[0] = now
        batch = dict(_last_used)
        _last_used.clear()
        asyncio.get_running_loop().create_task(_flush_last_used(batch))
    return True


async def _flush_last_used(batch: dict[int, object]) -> None:
    try:
        for pk, when in batch.items():
            await ApiKey.objects.filter(pk=pk).aupdate(last_used_at=when)
    except Exception:  # a busy database loses a "last used" mark, never a request
        logger.warning("could not record when %s API key(s) were last used", len(batch), exc_info=True)


def _unauthorized() -> JsonResponse:
    response = openai_error(401, "Missing or invalid API key. Send 'Authorization: Bearer <api key>'.",
                            "invalid_request_error", "invalid_api_key")
    response["WWW-Authenticate"] = 'Bearer realm="gateway"'
    return response


@csrf_exempt
@require_GET
async def list_models(request: HttpRequest) -> HttpResponse:
    if not await _authenticated(request):
        return _unauthorized()
    data = []
    async for model in Model.objects.order_by("name"):
        ready = await model.instances.filter(state=InstanceState.RUNNING).acount()
        data.append({"id": model.name, "object": "model", "created": int(model.created_at.timestamp()),
                     "owned_by": "aimind", "categories": model.categories, "ready_replicas": ready})
    return JsonResponse({"object": "list", "data": data})


def _requested_model(request: HttpRequest) -> tuple[str | None, bool, str | None]:
    """(model name, wants a stream, error) from a JSON or multipart body."""
    content_type = request.content_type or ""
    raw = request.body  # first: the form is then parsed from these bytes, and they are still there to pass on
    if content_type.startswith("multipart/") or content_type == "application/x-www-form-urlencoded":
        return request.POST.get("model"), request.POST.get("stream") in ("true", "True", "1"), None
    try:
        body = json.loads(raw or b"{}")
    except (ValueError, UnicodeDecodeError):
        return None, False, "The request body is not valid JSON."
    if not isinstance(body, dict):
        return None, False, "The request body must be a JSON object."
    return body.get("model"), bool(body.get("stream")), None


@csrf_exempt
@require_POST
async def proxy(request: HttpRequest, route: str) -> HttpResponse:
    if not await _authenticated(request):
        return _unauthorized()
    if route in JSON_ROUTES and request.content_type != "application/json":
        return openai_error(415, f"Send the body of /v1/{route} as application/json, not "
                                 f"{request.content_type or 'nothing'}.", "invalid_request_error",
                            "unsupported_media_type")
    if route not in JSON_ROUTES and not (request.content_type or "").startswith("multipart/form-data"):
        return openai_error(415, f"Send the body of /v1/{route} as multipart/form-data.", "invalid_request_error",
                            "unsupported_media_type")
    model_name, stream, problem = _requested_model(request)
    if problem:
        return openai_error(400, problem, "invalid_request_error", "invalid_body")
    if not model_name or not isinstance(model_name, str):
        return openai_error(400, "The 'model' field is required.", "invalid_request_error", "model_required")
    try:
        upstream = await pick_upstream(model_name)
    except UnknownModel:
        return openai_error(404, f"The model '{model_name}' does not exist.", "invalid_request_error",
                            "model_not_found")
    except NoRunningInstance:
        return openai_error(503, f"The model '{model_name}' has no running instance.", "service_unavailable",
                            "no_running_instance")
    headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_HEADERS}
    if upstream.api_key:
        headers["Authorization"] = f"Bearer {upstream.api_key}"
    client = _client()
    outgoing = client.build_request("POST", f"{upstream.base_url}/v1/{route}", content=request.body, headers=headers)
    try:
        response = await client.send(outgoing, stream=True)
    except httpx.HTTPError as exc:
        logger.warning("instance %s unreachable: %s", upstream.instance_id, exc)
        return openai_error(502, f"The instance serving '{model_name}' could not be reached.", "api_error",
                            "upstream_unreachable")
    passed = {k: v for k, v in response.headers.items() if k.lower() not in _HOP_HEADERS}
    if stream or response.headers.get("content-type", "").startswith("text/event-stream"):
        return _streamed(response, passed)
    body = await response.aread()
    await response.aclose()
    if upstream.backend == "vox-box":
        refused = _vox_box_error(response, body)
        if refused is not None:
            return refused
    reply = HttpResponse(body, status=response.status_code)
    for k, v in passed.items():
        reply[k] = v
    return reply


def _vox_box_error(response: httpx.Response, body: bytes) -> JsonResponse | None:
    """vox-box answers its errors with HTTP 200 and `{"status_code": 4xx, "detail": …}`: the client gets that real
    status, in OpenAI's error shape."""
    if response.status_code != 200 or not response.headers.get("content-type", "").startswith("application/json"):
        return None
    try:
        payload = json.loads(body)
    except ValueError:
        return None
    status = payload.get("status_code") if isinstance(payload, dict) else None
    if not isinstance(status, int) or isinstance(status, bool) or not 400 <= status <= 599:
        return None
    kind = "invalid_request_error" if status < 500 else "api_error"
    return openai_error(status, str(payload.get("detail") or "the backend refused the request"), kind,
                        "backend_error")


def _streamed(response: httpx.Response, headers: dict[str, str]) -> StreamingHttpResponse:
    async def chunks():
        try:
            async for chunk in response.aiter_raw():
                yield chunk
        except httpx.HTTPError as exc:
            logger.warning("stream from backend broke: %s", exc)
        finally:
            await response.aclose()

    reply = StreamingHttpResponse(chunks(), status=response.status_code)
    for k, v in headers.items():
        reply[k] = v
    reply["Cache-Control"] = "no-cache"
    reply["X-Accel-Buffering"] = "no"  # tell any proxy in front not to buffer the stream
    return reply
