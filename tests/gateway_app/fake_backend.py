"""A stand-in backend for the gateway's tests: a small HTTP/1.1 server on a free loopback port, in the test's own
event loop, that answers like llama-server (JSON with `usage`, or an SSE stream) and notes what it was sent and when
a client hung up on it. Also `call`, which drives the gateway app the way uvicorn does, and `deploy`, which makes a
model whose running instances are such backends."""

from __future__ import annotations

import asyncio
import json
import socket
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import uvicorn
from asgiref.sync import sync_to_async

from gateway_app.proxy import Gateway
from models_app.models import Model, ModelInstance
from tests.factories import make_worker


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class FakeBackend:
    name: str = "fake"
    stream_pieces: int = 3
    piece_delay: float = 0.0  # seconds between streamed pieces
    answer_delay: float = 0.0  # seconds before a plain answer
    answer: dict | None = None  # a plain answer of its own (default: a chat completion with usage)
    stream_events: list[dict] | None = None  # streamed chunks of its own (default: `stream_pieces` text pieces)
    refuse_with: int = 0  # a status to answer every request with, and an error in OpenAI's shape (as llama-server)
    health_status: int = 200  # what GET /health answers (llama-server: 503 while it loads)
    health_checks: int = 0  # GET /health asked (not in `received`)
    break_after_pieces: int | None = None  # each stream's connection dropped after this many events (a crash)
    received: list[dict] = field(default_factory=list)
    close_after_answer: bool = False  # as llama-server does after a stream, without saying so
    hung_up: int = 0  # answers cut short because the client closed the connection
    connections: int = 0  # connections accepted
    open_connections: int = 0
    pieces_sent: int = 0
    busy: int = 0  # requests being answered now
    most_busy: int = 0
    port: int = 0
    _server: asyncio.base_events.Server | None = None

    async def start(self, port: int = 0) -> int:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        self._server.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open_connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
                body = await reader.readexactly(int(headers.get("content-length", 0)))
                if lines[0].startswith("GET /health "):
                    self.health_checks += 1
                    writer.write(b"HTTP/1.1 %d Health\r\nContent-Type: application/json\r\nContent-Length: 15\r\n\r\n"
                                 b'{"status":"ok"}' % self.health_status)
                    await writer.drain()
                    continue
                self.received.append({"path": lines[0].split(" ")[1], "headers": headers, "body": body})
                self.busy += 1
                self.most_busy = max(self.most_busy, self.busy)
                try:
                    is_json = headers.get("content-type", "").startswith("application/json")
                    await self._answer(reader, writer, json.loads(body or b"{}") if is_json else {})
                finally:
                    self.busy -= 1
                if self.close_after_answer:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.open_connections -= 1
            writer.close()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: dict) -> None:
        usage = {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}
        messages_api = self.received[-1]["path"] == "/v1/messages"
        if self.refuse_with:
            body = json.dumps({"error": {"code": self.refuse_with, "message": "the fake backend refuses",
                                         "type": "invalid_request_error"}}).encode()
            writer.write(b"HTTP/1.1 %d Refused\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                         % (self.refuse_with, len(body), body))
            await writer.drain()
            return
        if not request.get("stream"):
            await asyncio.sleep(self.answer_delay)
            if writer.transport.is_closing() or reader.at_eof():
                self.hung_up += 1
                return
            chat = {"object": "chat.completion", "served_by": self.name, "usage": usage,
                    "choices": [{"message": {"role": "assistant", "content": "hi"}}]}
            if messages_api:  # llama-server's own Messages answer
                chat = {"id": "chatcmpl-fake", "type": "message", "role": "assistant", "model": request.get("model"),
                        "content": [{"type": "text", "text": "hi"}], "stop_reason": "end_turn",
                        "stop_sequence": None, "served_by": self.name,
                        "usage": {"cache_read_input_tokens": 1, "input_tokens": 4, "output_tokens": 7}}
            body = json.dumps(self.answer or chat).encode()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json; charset=utf-8\r\nServer: fake\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()
            return
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        if messages_api:
            sse = [f"event: {e['type']}\ndata: {json.dumps(e)}\n\n" for e in self._messages_events(request)]
        else:
            events = [dict(e) for e in self.stream_events] if self.stream_events else [
                {"choices": [{"delta": {"content": f"piece {n} "}}], "served_by": self.name}
                for n in range(self.stream_pieces)]
            if (request.get("stream_options") or {}).get("include_usage"):
                events.append({"choices": [], "usage": usage})
            else:
                events[-1]["timings"] = {"prompt_n": 3, "predicted_n": self.stream_pieces}
            sse = [*(f"data: {json.dumps(e)}\n\n" for e in events), "data: [DONE]\n\n"]
        for n, event in enumerate(sse):
            if writer.transport.is_closing() or reader.at_eof():
                self.hung_up += 1
                return
            if n == self.break_after_pieces:
                await writer.drain()
                writer.transport.abort()  # gone mid-answer, without the stream's end
                return
            data = event.encode()
            writer.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.pieces_sent += 1
            await asyncio.sleep(self.piece_delay)
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    def _messages_events(self, request: dict) -> list[dict]:
        """A Messages stream as llama-server sends it (input tokens first, output tokens last; no [DONE])."""
        start = {"id": "chatcmpl-fake", "type": "message", "role": "assistant", "content": [],
                 "model": request.get("model"), "stop_reason": None, "stop_sequence": None,
                 "usage": {"cache_read_input_tokens": 1, "input_tokens": 4, "output_tokens": 0}}
        return [{"type": "message_start", "message": start},
                {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
                *({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": f"piece {n} "}}
                  for n in range(self.stream_pieces)),
                {"type": "content_block_stop", "index": 0},
                {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                 "usage": {"output_tokens": self.stream_pieces}},
                {"type": "message_stop"}]


async def _django_404(scope, receive, send):
    await send({"type": "http.response.start", "status": 404, "headers": []})
    await send({"type": "http.response.body", "body": b"not found"})


APP = Gateway(_django_404)  # what aimind.asgi serves, with a stand-in for Django behind it
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}


def deploy(name: str, ports: list[int], backend: str = "llama-box") -> Model:
    """A model with one running instance per port (a port nobody listens on: an instance that refuses)."""
    worker = make_worker(f"w-{name}")
    model = Model.objects.create(name=name, source="local_path", local_path="/m.gguf", replicas=len(ports),
                                 backend=backend)
    for n, port in enumerate(ports):
        ModelInstance.objects.create(model=model, name=f"{name}-{n}", worker=worker, port=port, state="running",
                                     backend=backend,
                                     backend_api_key="" if backend == "vox-box" else f"secret-{name}-{n}")
    return model


async def call(app, method: str, path: str, *, key: str | None = None, json_body=None, body: bytes = b"",
               headers: dict[str, str] | None = None, leave_after_pieces: int | None = None,
               leave_after: float | None = None) -> dict:
    """One request through an ASGI app: `{"status", "headers", "body", "pieces"}`. The client hangs up after
    `leave_after_pieces` pieces of the answer's body, or after `leave_after` seconds."""
    sent_headers = {"content-type": "application/json", **(headers or {})}
    if key is not None:
        sent_headers["authorization"] = f"Bearer {key}"
    if json_body is not None:
        body = json.dumps(json_body).encode()
    scope = {"type": "http", "method": method, "path": path, "query_string": b"", "headers": [
        (k.encode(), v.encode()) for k, v in sent_headers.items()] + [(b"content-length", str(len(body)).encode())]}
    answer = {"status": None, "headers": {}, "pieces": []}
    left = asyncio.Event()
    delivered = False

    async def receive():
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await left.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        if message["type"] == "http.response.start":
            answer["status"] = message["status"]
            answer["headers"] = {k.decode(): v.decode() for k, v in message["headers"]}
        elif message.get("body"):
            answer["pieces"].append(message["body"])
            if leave_after_pieces is not None and len(answer["pieces"]) >= leave_after_pieces:
                left.set()

    if leave_after is not None:
        asyncio.get_running_loop().call_later(leave_after, left.set)
    await app(scope, receive, send)
    answer["body"] = b"".join(answer["pieces"])
    return answer


@asynccontextmanager
async def serving(model: str, *backends: FakeBackend | int, backend: str = "llama-box"):
    """The backends started, and deployed as the running instances of `model` (a port number: one that refuses)."""
    ports = [b if isinstance(b, int) else await b.start() for b in backends]
    started = [b for b in backends if isinstance(b, FakeBackend)]
    await sync_to_async(deploy)(model, ports, backend)
    try:
        yield
    finally:
        for b in started:
            await b.stop()


@asynccontextmanager
async def uvicorn_serving(app=APP, log_level: str = "warning"):
    """`app` (the gateway by default) served by uvicorn on a loopback port, in this event loop (so its database
    reads see the test's); yields its base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="off", log_level=log_level))
    task = asyncio.get_running_loop().create_task(server.serve())
    while not server.started:
        assert not task.done(), "uvicorn did not start"
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task
