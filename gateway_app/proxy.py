"""The OpenAI-compatible /v1 routes as a plain ASGI app: aimind.asgi hands it every request under /v1/, past
Django's request and middleware machinery. Keys and routes come from memory (gateway_app.tables), backends are
reached over pooled keep-alive connections (gateway_app.upstream); errors come in OpenAI's shape."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import NoReturn

from asgiref.sync import sync_to_async
from django.conf import settings

from aimind import metrics
from gateway_app import limits, stream_usage, usage, waking
from gateway_app.authentication import bearer_token
from gateway_app.routing import note_failure, note_success, pick, stop_health_checks
from gateway_app.tables import TABLES, Key, Replica, Route, done_with_database
from gateway_app.upstream import POOLS, ConnectFailed, Exchange, UpstreamBroken

logger = logging.getLogger(__name__)

JSON_ROUTES = frozenset({"chat/completions", "completions", "embeddings", "rerank", "audio/speech", "messages"})
UPLOAD_ROUTES = frozenset({"audio/transcriptions"})
# Headers that describe one hop, not the message, are never passed on; nor are the client's credentials (each
# backend gets its instance's own secret), nor Accept-Encoding (bodies pass through as they are: nothing to decode).
HOP_HEADERS = frozenset({b"connection", b"keep-alive", b"transfer-encoding", b"content-length", b"content-encoding",
                         b"host", b"authorization", b"x-api-key", b"cookie", b"upgrade", b"te", b"trailer",
                         b"proxy-authorization", b"proxy-authenticate", b"accept-encoding", b"expect"})
ANSWER_SKIP = HOP_HEADERS | {b"server", b"date"}  # uvicorn adds its own
# What Django's security middleware added to the gateway's answers.
SAFETY_HEADERS = [(b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"),
                  (b"referrer-policy", b"same-origin"), (b"cross-origin-opener-policy", b"same-origin")]
JSON_HEADERS = [(b"content-type", b"application/json"), *SAFETY_HEADERS]
STREAM_HEADERS = [(b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]  # no proxy in front may buffer
TAIL = 16384  # bytes of a stream's end kept to find its usage


class StreamCutShort(Exception):
    """The backend broke off an answer whose start the client has: raised out of the app, so that the server closes
    the connection before the body's end (uvicorn does so for an app that fails after its answer began), and the
    client sees an answer cut short instead of one that looks complete."""


def _not_a_stream_cut_short(record: logging.LogRecord) -> bool:
    """uvicorn logs an app's exception with its traceback as an error: a stream cut short on purpose has had its
    one warning from the gateway already."""
    return not (record.exc_info and isinstance(record.exc_info[1], StreamCutShort))


logging.getLogger("uvicorn.error").addFilter(_not_a_stream_cut_short)


async def _answer(send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [*headers, (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def error_body(message: str, type_: str, code: str | None) -> bytes:
    return json.dumps({"error": {"message": message, "type": type_, "code": code}}).encode()


async def _error(send, status: int, message: str, type_: str, code: str | None, extra=()) -> None:
    await _answer(send, status, error_body(message, type_, code), [*JSON_HEADERS, *extra])


# How a route refuses a request: (send, status, message, type, code, extra headers). OpenAI's shape is `_error`;
# /v1/messages answers in Anthropic's (gateway_app.anthropic.refuse). Every step shared by the routes takes one.
Refuse = Callable[..., Awaitable[None]]


async def _unauthorized(send, refuse: Refuse = _error) -> None:
    await refuse(send, 401, "Missing or invalid API key. Send 'Authorization: Bearer <api key>' or "
                            "'x-api-key: <api key>'.", "invalid_request_error", "invalid_api_key",
                 [(b"www-authenticate", b'Bearer realm="gateway"')])


@dataclass(slots=True)
class Admitted:
    """A request that passed the shared steps, ready to be forwarded."""

    key: Key
    target: Route
    fields: dict  # the JSON body (empty for a multipart one)
    body: bytes
    headers: bytes  # the client's header lines that are passed on, each ending in CRLF
    stream: bool


class Gateway:
    """/v1/ here; anything else (and an unknown /v1/ path: Django's 404) to `fallback`."""

    def __init__(self, fallback) -> None:
        self.fallback = fallback

    async def __call__(self, scope, receive, send) -> None:
        path = scope["path"]
        if scope["type"] != "http" or not path.startswith("/v1/"):
            return await self.fallback(scope, receive, send)
        route = path[4:]
        if route == "models":
            allowed = "GET"
        elif route in JSON_ROUTES or route in UPLOAD_ROUTES:
            allowed = "POST"
        else:
            return await self.fallback(scope, receive, send)
        if scope["method"] != allowed:
            return await _answer(send, 405, b"", [(b"allow", allowed.encode()),
                                                  (b"content-type", b"text/html; charset=utf-8"), *SAFETY_HEADERS])
        refuse = _error
        cut_short = None
        try:
            if allowed == "GET":
                await self.list_models(scope, send)
            elif route == "messages":
                from gateway_app import anthropic  # it builds on this module

                refuse = anthropic.refuse
                await anthropic.messages(self, scope, receive, send)
            else:
                await self.proxy(scope, receive, send, route)
        except StreamCutShort as exc:
            cut_short = exc
        except Exception:
            logger.exception("the gateway failed on %s", path)
            try:
                await refuse(send, 500, "The gateway failed on this request.", "api_error", "internal_error")
            except Exception:
                pass  # the answer had begun
        if time.monotonic() - usage.METER.flushed_at > 3 * settings.GATEWAY_USAGE_FLUSH_INTERVAL:
            await flush_usage()  # no flusher task in this process (no lifespan): on the way out, now and then
        await TABLES.settle()
        if cut_short is not None:
            raise cut_short

    async def _key(self, scope) -> Key | None:
        """The key of `Authorization: Bearer <key>`, or else of `x-api-key: <key>` (Anthropic's clients send that)."""
        authorization = api_key = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                authorization = value
            elif name == b"x-api-key":
                api_key = value
        token = bearer_token(authorization.decode("latin-1")) if authorization else None
        if token is None and api_key is not None:
            token = api_key.decode("latin-1").strip() or None
        if token is None:
            return None
        key = (await TABLES.current()).key(token)
        if key is None and await TABLES.recheck():
            key = TABLES.snapshot.key(token)
        if key is not None:
            usage.METER.note_use(key.id)
        return key

    async def list_models(self, scope, send) -> None:
        key = await self._key(scope)
        if key is None:
            return await _unauthorized(send)
        await _answer(send, 200, key.models_body or TABLES.snapshot.models_body, JSON_HEADERS)

    async def proxy(self, scope, receive, send, route: str) -> None:
        admitted = await self.admit(scope, receive, send, route)
        if admitted is None:
            return
        body, usage_filter = admitted.body, None
        if admitted.stream and route in ("chat/completions", "completions"):  # counted exactly: asked of the backend
            body, usage_filter = stream_usage.ask_for_usage(admitted.fields, body)
        head = b"POST /v1/%s HTTP/1.1\r\n%scontent-length: %d\r\n" % (route.encode(), admitted.headers, len(body))
        forwarding = Forwarding(admitted.key, admitted.target, admitted.stream, send)
        forwarding.usage_filter = usage_filter
        await forwarding.run(receive, head, body)

    async def admit(self, scope, receive, send, route: str, refuse: Refuse = _error,
                    check: Callable[[dict], str | None] | None = None) -> Admitted | None:
        """The steps every forwarded request takes, whatever its API: the key, the body (`check` may refuse a JSON
        one: a problem to answer 400 with), the model, the key's and the model's limits (gateway_app.limits), a
        running replica. None when refused, answered already through `refuse` (each API's own error shape)."""
        key = await self._key(scope)
        if key is None:
            return await _unauthorized(send, refuse)
        passed, full_type = [], ""
        for name, value in scope["headers"]:
            if name not in HOP_HEADERS:
                passed.append(b"%s: %s\r\n" % (name, value))
                if name == b"content-type":
                    full_type = value.decode("latin-1")
        content_type = full_type.split(";", 1)[0].strip().lower()
        if route in JSON_ROUTES and content_type != "application/json":
            return await refuse(send, 415, f"Send the body of /v1/{route} as application/json, not "
                                           f"{content_type or 'nothing'}.", "invalid_request_error",
                                "unsupported_media_type")
        if route in UPLOAD_ROUTES and content_type != "multipart/form-data":
            return await refuse(send, 415, f"Send the body of /v1/{route} as multipart/form-data.",
                                "invalid_request_error", "unsupported_media_type")
        body = await _read_body(receive)
        if body is None:
            return  # the client left, or the body was refused as too large (answered already)
        fields: dict = {}
        if route in JSON_ROUTES:
            fields, problem = _json_fields(body)
            model_name, stream = fields.get("model"), bool(fields.get("stream"))
            if problem is None and check is not None:
                problem = check(fields)
        else:
            model_name, stream, problem = await asyncio.to_thread(_form_fields, full_type, body)
        if problem:
            return await refuse(send, 400, problem, "invalid_request_error", "invalid_body")
        if not model_name or not isinstance(model_name, str):
            return await refuse(send, 400, "The 'model' field is required.", "invalid_request_error",
                                "model_required")
        refused = limits.not_allowed(key, model_name)
        if refused is not None:
            return await refuse(send, refused.status, refused.message, refused.type, refused.code)
        target = TABLES.snapshot.routes.get(model_name)
        if (target is None or not target.replicas) and await TABLES.recheck():
            target = TABLES.snapshot.routes.get(model_name)
        if target is None:
            return await refuse(send, 404, f"The model '{model_name}' does not exist.", "invalid_request_error",
                                "model_not_found")
        refused = await limits.LIMITER.admit(key, target)
        if refused is not None:
            usage.METER.note_served(model_name, refused.status, 0.0, key.id)
            return await refuse(send, refused.status, refused.message, refused.type, refused.code, refused.headers)
        if not target.replicas and target.wakes:  # it sleeps when idle: woken, and waited for (bounded)
            target = await waking.wait_for_replica(target)
            if not target.replicas:
                usage.METER.note_served(model_name, 503, 0.0, key.id)
                return await refuse(send, 503, waking.waking_message(model_name), "service_unavailable",
                                    "model_waking", [waking.RETRY_AFTER])
        if not target.replicas:
            usage.METER.note_served(model_name, 503, 0.0, key.id)
            return await refuse(send, 503, f"The model '{model_name}' has no running instance.",
                                "service_unavailable", "no_running_instance")
        return Admitted(key, target, fields, body, b"".join(passed), stream)


class Forwarding:
    """One request on its way to a replica and its answer on the way back; ends the backend's work when the client
    leaves."""

    def __init__(self, key: Key, target: Route, stream: bool, send, refuse: Refuse = _error) -> None:
        self.key, self.target, self.stream, self._send, self.refuse = key, target, stream, send, refuse
        self.replica: Replica | None = None
        self.exchange: Exchange | None = None
        self.answered = False
        self.status = 0  # as sent to the client
        self.began = time.monotonic()
        self.usage_filter: stream_usage.UsageFilter | None = None  # hides the usage the client did not ask for
        self.tokens: int | None = None  # the answer's, once counted
        self.streamed_events = 0  # server-sent events passed on (a stream cut short counts one token each)

    async def send(self, message: dict) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
        elif not message.get("more_body"):
            self.answered = True  # uvicorn's receive() says "disconnect" from now on: no client has left
        await self._send(message)

    async def _cancel_when_gone(self, receive, task: asyncio.Task) -> None:
        """Waits for the client to leave (the body is read by now: only a disconnect can come), then cancels `task`
        (unless the answer is complete)."""
        while (await receive())["type"] != "http.disconnect":
            pass
        if not self.answered:
            task.cancel()

    async def run(self, receive, head: bytes, body: bytes) -> None:
        task = asyncio.current_task()
        watcher = asyncio.get_running_loop().create_task(self._cancel_when_gone(receive, task))
        cut_short = None
        try:
            if await self.connect(head, body):
                await self.answer()
        except asyncio.CancelledError:
            if not watcher.done() or watcher.cancelled():
                raise  # not the client leaving: the server stopping
            task.uncancel()
        except StreamCutShort as exc:
            cut_short = exc
            self.status, self.answered = 502, True  # counted as the backend's failure, not as the client leaving
        finally:
            watcher.cancel()
            if self.exchange is not None and not self.exchange.done:
                self.exchange.abort()  # the client left mid-answer: the backend stops generating
            if self.replica is not None:
                self.replica.outstanding -= 1
            if self.tokens is None and self.streamed_events:
                self.note_tokens(0, self.streamed_events)  # cut short: the tokens it was sent, one per event
            usage.METER.note_served(self.target.name, self.status if self.answered else 0,
                                    time.monotonic() - self.began, self.key.id)
        await limits.LIMITER.add_tokens(self.key, self.tokens or 0)  # answered already: the client waits not
        if cut_short is not None:
            raise cut_short

    async def connect(self, head: bytes, body: bytes) -> bool:
        """Send to the least busy replica; a replica that refuses the connection passes the request on. False when
        none took it (answered 502)."""
        tried: set[int] = set()
        rechecked = False
        name = self.target.name
        while True:
            replica = pick(self.target, tried)
            if replica is None:
                if not rechecked and await TABLES.recheck():  # the instances may have moved
                    rechecked = True
                    self.target = TABLES.snapshot.routes.get(name) or self.target
                    continue
                return await self._unreachable()
            tried.add(replica.instance_id)
            replica.outstanding += 1
            self.replica = replica
            try:
                to_head, to_body = self.request_for(replica, head, body)
                self.exchange = await POOLS.get(replica.host, replica.port).request(
                    to_head + replica.head + b"\r\n", to_body)
            except (ConnectFailed, UpstreamBroken) as exc:
                replica.outstanding -= 1
                self.replica = None
                note_failure(replica)
                logger.warning("instance %s unreachable: %s", replica.instance_id, exc)
                if isinstance(exc, ConnectFailed):
                    continue
                return await self._unreachable()
            note_success(replica)
            return True

    def request_for(self, replica: Replica, head: bytes, body: bytes) -> tuple[bytes, bytes]:
        """The request as `replica` is sent it (its own header lines follow `head`): as given, unless a subclass
        speaks to some backends in another API."""
        return head, body

    async def _unreachable(self) -> bool:
        await self.refuse(self.send, 502, f"The instance serving '{self.target.name}' could not be reached.",
                          "api_error", "upstream_unreachable")
        return False

    async def answer(self) -> None:
        exchange, send = self.exchange, self.send
        headers = [(k, v) for k, v in exchange.headers if k not in ANSWER_SKIP]
        content_type = next((v for k, v in headers if k == b"content-type"), b"")
        if self.stream or content_type.startswith(b"text/event-stream"):
            await send({"type": "http.response.start", "status": exchange.status,
                        "headers": [*headers, *STREAM_HEADERS, *SAFETY_HEADERS]})
            tail = sent = b""
            try:
                while chunk := await exchange.read():
                    tail = chunk[-TAIL:] if len(chunk) >= TAIL else (tail + chunk)[-TAIL:]
                    self.streamed_events += chunk.count(b"data: {")
                    if self.usage_filter is not None and not (chunk := self.usage_filter.feed(chunk)):
                        continue
                    await self._send({"type": "http.response.body", "body": chunk, "more_body": True})
                    sent = chunk
            except UpstreamBroken as exc:
                await self.cut_short(exc, content_type, sent)
            if self.usage_filter is not None and (rest := self.usage_filter.rest()):
                await self._send({"type": "http.response.body", "body": rest, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
            self.count(tail)
            return
        try:
            body = await exchange.body()
        except UpstreamBroken as exc:
            logger.warning("instance %s broke off its answer: %s", self.replica.instance_id, exc)
            return await self.refuse(send, 502, f"The instance serving '{self.target.name}' broke off its answer.",
                                     "api_error", "upstream_unreachable")
        self.count(body)
        if self.replica.backend == "vox-box":
            refused = _vox_box_error(exchange.status, content_type, body)
            if refused is not None:
                return await _error(send, *refused)
        await _answer(send, exchange.status, body, [*headers, *SAFETY_HEADERS])

    async def cut_short(self, exc: UpstreamBroken, content_type: bytes, sent: bytes) -> NoReturn:
        """A stream broke off: an event stream whose events came whole so far gets an error event in OpenAI's
        shape; then StreamCutShort, for the connection to close before the body's end."""
        logger.warning("instance %s broke off its stream: %s", self.replica.instance_id, exc)
        if content_type.startswith(b"text/event-stream") and (not sent or sent.endswith((b"\n\n", b"\r\n\r\n"))):
            event = error_body(f"The instance serving '{self.target.name}' broke off its answer.", "api_error",
                               "upstream_unreachable")
            await self._send({"type": "http.response.body", "body": b"data: %s\n\n" % event, "more_body": True})
        raise StreamCutShort(f"instance {self.replica.instance_id}: {exc}")

    def count(self, tail: bytes) -> None:
        prompt, completion = usage.tokens_in(tail) if self.exchange.status == 200 else (0, 0)
        self.note_tokens(prompt, completion)

    def note_tokens(self, prompt: int, completion: int) -> None:
        """Every forwarded answer's tokens, whatever its API, pass here once."""
        usage.METER.note_answer(self.key.id, self.target.name, prompt, completion)
        self.tokens = prompt + completion


async def _read_body(receive) -> bytes | None:
    message = await receive()
    if message["type"] != "http.request":
        return None
    if not message.get("more_body"):
        return message.get("body", b"")
    parts = [message.get("body", b"")]
    while message.get("more_body"):
        message = await receive()
        if message["type"] != "http.request":
            return None
        parts.append(message.get("body", b""))
    return b"".join(parts)


def _json_fields(raw: bytes) -> tuple[dict, str | None]:
    """(the fields, problem) from a JSON body."""
    try:
        body = json.loads(raw or b"{}")
    except (ValueError, UnicodeDecodeError):
        return {}, "The request body is not valid JSON."
    if not isinstance(body, dict):
        return {}, "The request body must be a JSON object."
    return body, None


def _form_fields(content_type: str, raw: bytes) -> tuple[object, bool, str | None]:
    """(model, wants a stream, problem) from a multipart body; the files in it are skipped, not kept."""
    from io import BytesIO

    from django.core.files.uploadhandler import FileUploadHandler
    from django.http.multipartparser import MultiPartParser, MultiPartParserError

    class SkipFiles(FileUploadHandler):
        def receive_data_chunk(self, raw_data, start):
            return None

        def file_complete(self, file_size):
            return None

    meta = {"CONTENT_TYPE": content_type, "CONTENT_LENGTH": str(len(raw))}
    try:
        fields, _ = MultiPartParser(meta, BytesIO(raw), [SkipFiles()], "utf-8").parse()
    except (MultiPartParserError, ValueError) as exc:
        return None, False, f"The multipart body could not be read: {exc}"
    return fields.get("model"), fields.get("stream") in ("true", "True", "1"), None


def _vox_box_error(status: int, content_type: bytes, body: bytes) -> tuple[int, str, str, str] | None:
    """vox-box answers its errors with HTTP 200 and `{"status_code": 4xx, "detail": …}`: the client gets that real
    status, in OpenAI's error shape."""
    if status != 200 or not content_type.startswith(b"application/json"):
        return None
    try:
        payload = json.loads(body)
    except ValueError:
        return None
    code = payload.get("status_code") if isinstance(payload, dict) else None
    if not isinstance(code, int) or isinstance(code, bool) or not 400 <= code <= 599:
        return None
    kind = "invalid_request_error" if code < 500 else "api_error"
    return code, str(payload.get("detail") or "the backend refused the request"), kind, "backend_error"


async def flush_usage() -> None:
    await waking.flush_last_requests()
    served = usage.METER.take_served()
    counts, last_used, minutes = usage.METER.take()
    if served or counts:
        tokens: dict[str, list[int]] = {}
        for (_, _, model), (_, prompt, completion) in counts.items():
            entry = tokens.setdefault(model, [0, 0])
            entry[0] += prompt
            entry[1] += completion
        try:
            await asyncio.to_thread(metrics.add_gateway, served, tokens)
        except Exception as exc:  # /metrics misses these counts; nothing else does
            logger.warning("could not add the gateway's counts for /metrics: %s", exc)
    if not counts and not last_used and not minutes:
        return
    try:
        await sync_to_async(_write_usage)(counts, last_used, minutes)
    except Exception:  # a busy database delays the counts, never a request
        usage.METER.put_back(counts, last_used, minutes)
        logger.warning("could not write the gateway's usage counts; keeping them for the next try", exc_info=True)


def _write_usage(counts: dict, last_used: dict, minutes: dict) -> None:
    try:
        usage.write(counts, last_used, minutes)
    finally:
        done_with_database()


async def _flush_now_and_then() -> None:
    while True:
        await asyncio.sleep(settings.GATEWAY_USAGE_FLUSH_INTERVAL)
        await flush_usage()


async def lifespan(scope, receive, send) -> None:
    """Per web process: load the tables before the first request, keep them current, write usage in batches (and
    what is left of it on the way out)."""
    tasks: list[asyncio.Task] = []
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            try:
                await TABLES.reload()
            except Exception:  # the first request tries again
                logger.warning("the gateway could not load its tables at start", exc_info=True)
            loop = asyncio.get_running_loop()
            tasks = [loop.create_task(TABLES.watch()), loop.create_task(_flush_now_and_then())]
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            for task in tasks:
                task.cancel()
            stop_health_checks()
            await flush_usage()
            await send({"type": "lifespan.shutdown.complete"})
            return
