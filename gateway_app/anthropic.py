"""Anthropic's Messages API, `POST /v1/messages`, through the same admission as the OpenAI routes (key, model,
replicas): passed through to llama-server, which speaks it; translated to and from chat completions for the other
backends (vLLM), streams included. Every refusal comes in Anthropic's error shape."""

from __future__ import annotations

import json
import logging
import uuid

from gateway_app.proxy import (
    ANSWER_SKIP,
    JSON_HEADERS,
    SAFETY_HEADERS,
    STREAM_HEADERS,
    TAIL,
    Admitted,
    Forwarding,
    Gateway,
    StreamCutShort,
    _answer,
)
from gateway_app.tables import Replica
from gateway_app.upstream import UpstreamBroken

logger = logging.getLogger(__name__)
_decoder = json.JSONDecoder()

SPEAKS_MESSAGES = frozenset({"llama-box"})  # backends whose own /v1/messages is used as it is
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 500: "api_error",
               503: "overloaded_error", 529: "overloaded_error"}
STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use", "function_call": "tool_use"}
SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), *STREAM_HEADERS, *SAFETY_HEADERS]


def error_body(status: int, message: str) -> dict:
    kind = ERROR_TYPES.get(status) or ("invalid_request_error" if status < 500 else "api_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


async def refuse(send, status: int, message: str, type_: str = "", code: str | None = None, extra=()) -> None:
    """gateway_app.proxy's refusals in Anthropic's shape; the kind of error follows from the status."""
    await _answer(send, status, json.dumps(error_body(status, message)).encode(), [*JSON_HEADERS, *extra])


def check(fields: dict) -> str | None:
    """What makes a Messages request unanswerable, naming the field (None: nothing)."""
    max_tokens = fields.get("max_tokens")
    if max_tokens is None:
        return "The 'max_tokens' field is required."
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        return f"max_tokens must be an integer of at least 1, not {max_tokens!r}."
    messages = fields.get("messages")
    if not isinstance(messages, list) or not messages:
        return "The 'messages' field is required: a list of at least one {role, content}."
    for n, message in enumerate(messages):
        if not isinstance(message, dict):
            return f"messages.{n} must be an object with 'role' and 'content'."
        if message.get("role") not in ("user", "assistant"):
            return f"messages.{n}.role must be 'user' or 'assistant', not {message.get('role')!r}."
        content = message.get("content")
        if not isinstance(content, str) and not (isinstance(content, list)
                                                  and all(isinstance(b, dict) for b in content)):
            return f"messages.{n}.content must be a string or a list of content blocks."
    system = fields.get("system")
    if system is not None and not isinstance(system, str | list):
        return "system must be a string or a list of text blocks."
    stops = fields.get("stop_sequences")
    if stops is not None and not (isinstance(stops, list) and all(isinstance(s, str) for s in stops)):
        return "stop_sequences must be a list of strings."
    try:  # the blocks' insides too (an image whose source is not an object …): a 400 here, not a 500 later
        to_chat(fields, "")
    except (AttributeError, TypeError, KeyError, ValueError) as exc:
        return f"A content block or tool could not be read: {type(exc).__name__}: {exc}."
    return None


async def messages(gateway: Gateway, scope, receive, send) -> None:
    admitted = await gateway.admit(scope, receive, send, "messages", refuse, check)
    if admitted is None:
        return
    body = admitted.body
    head = b"POST /v1/messages HTTP/1.1\r\n%scontent-length: %d\r\n" % (admitted.headers, len(body))
    await Messages(admitted, send).run(receive, head, body)


class Messages(Forwarding):
    """A Messages request on its way: as it is to a backend that speaks the API, else as a chat completion, whose
    answer (plain or streamed) comes back as a message."""

    def __init__(self, admitted: Admitted, send) -> None:
        super().__init__(admitted.key, admitted.target, admitted.stream, send, refuse)
        self.fields, self.headers = admitted.fields, admitted.headers
        self.translated = False  # the replica that took it was asked in chat completions

    def request_for(self, replica: Replica, head: bytes, body: bytes) -> tuple[bytes, bytes]:
        self.translated = replica.backend not in SPEAKS_MESSAGES
        if not self.translated:
            return head, body
        chat = json.dumps(to_chat(self.fields, self.target.name)).encode()
        return b"POST /v1/chat/completions HTTP/1.1\r\n%scontent-length: %d\r\n" % (self.headers, len(chat)), chat

    async def answer(self) -> None:
        exchange = self.exchange
        if not 200 <= exchange.status < 300:
            return await self._refused()
        content_type = next((v for k, v in exchange.headers if k == b"content-type"), b"")
        streamed = content_type.startswith(b"text/event-stream")
        if not self.translated and not streamed:
            return await self._plain_as_is()
        if not self.translated:
            return await self._stream_as_is()
        if streamed:
            return await self._stream_translated()
        try:
            body = await exchange.body()
        except UpstreamBroken:
            return await self._broke_off()
        try:
            chat = json.loads(body)
            message = to_message(chat, self.target.name, self.fields.get("stop_sequences") or [])
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
            logger.warning("instance %s answered no chat completion: %s", self.replica.instance_id, exc)
            self.note_tokens(0, 0)
            return await refuse(self.send, 502, f"The instance serving '{self.target.name}' gave an answer that "
                                                "is not a chat completion.")
        self.note_tokens(message["usage"]["input_tokens"], message["usage"]["output_tokens"])
        await _answer(self.send, 200, json.dumps(message).encode(), JSON_HEADERS)

    async def _broke_off(self) -> None:
        logger.warning("instance %s broke off its answer", self.replica.instance_id)
        self.note_tokens(0, 0)
        await refuse(self.send, 502, f"The instance serving '{self.target.name}' broke off its answer.")

    async def _refused(self) -> None:
        """The backend's own error answer, in Anthropic's shape with its status."""
        status = self.exchange.status
        try:
            body = await self.exchange.body()
        except UpstreamBroken:
            body = b""
        self.note_tokens(0, 0)
        await refuse(self.send, status, backend_error_message(body) or f"The backend answered {status}.")

    async def _plain_as_is(self) -> None:
        try:
            body = await self.exchange.body()
        except UpstreamBroken:
            return await self._broke_off()
        self.note_tokens(*tokens_in(body, body))
        headers = [(k, v) for k, v in self.exchange.headers if k not in ANSWER_SKIP]
        await _answer(self.send, self.exchange.status, body, [*headers, *SAFETY_HEADERS])

    async def _stream_as_is(self) -> None:
        """llama-server's own events, passed on as they come; its usage is in the first event (input) and the last
        but one (output)."""
        await self.send({"type": "http.response.start", "status": self.exchange.status, "headers": SSE_HEADERS})
        head = tail = b""
        try:
            while chunk := await self.exchange.read():
                await self._send({"type": "http.response.body", "body": chunk, "more_body": True})
                if len(head) < TAIL:
                    head += chunk[:TAIL]
                tail = chunk[-TAIL:] if len(chunk) >= TAIL else (tail + chunk)[-TAIL:]
        except UpstreamBroken as exc:
            self.note_tokens(*tokens_in(head, tail))
            if not tail or tail.endswith((b"\n\n", b"\r\n\r\n")):  # events came whole so far: an error event can follow
                await self._send({"type": "http.response.body", "more_body": True,
                                  "body": sse("error", error_body(502, "The backend broke off its answer."))})
            logger.warning("instance %s broke off its stream: %s", self.replica.instance_id, exc)
            raise StreamCutShort(f"instance {self.replica.instance_id}: {exc}") from exc
        await self.send({"type": "http.response.body", "body": b""})
        self.note_tokens(*tokens_in(head, tail))

    async def _stream_translated(self) -> None:
        events = StreamTranslation(self.target.name, self.fields.get("stop_sequences") or [])
        await self.send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
        await self._send({"type": "http.response.body", "body": events.start(), "more_body": True})
        try:
            while chunk := await self.exchange.read():
                out = events.feed(chunk)
                if out:
                    await self._send({"type": "http.response.body", "body": out, "more_body": True})
        except UpstreamBroken as exc:
            events.broken = True
            self.note_tokens(events.input_tokens, events.output_tokens)
            await self._send({"type": "http.response.body", "body": events.finish(), "more_body": True})
            logger.warning("instance %s broke off its stream: %s", self.replica.instance_id, exc)
            raise StreamCutShort(f"instance {self.replica.instance_id}: {exc}") from exc
        await self.send({"type": "http.response.body", "body": events.finish()})
        self.note_tokens(events.input_tokens, events.output_tokens)


def backend_error_message(body: bytes) -> str | None:
    """The message of an error answer in OpenAI's shape (`{"error": {"message"}}`), vLLM's older one
    (`{"message"}`), FastAPI's (`{"detail"}`) or Anthropic's own."""
    try:
        payload = json.loads(body)
    except ValueError:
        return body.decode("utf-8", "replace").strip()[:1000] or None
    if not isinstance(payload, dict):
        return None
    error = payload.get("error")
    if isinstance(error, dict):
        return str(error.get("message") or "") or None
    if isinstance(error, str):
        return error
    message = payload.get("message") or payload.get("detail")
    return str(message) if message else None


def _usage_in(data: bytes, first: bool = False) -> dict:
    """The last (or first) `"usage": {…}` object in a piece of an answer; {} when there is none."""
    at = data.find(b'"usage"') if first else data.rfind(b'"usage"')
    brace = data.find(b"{", at + 7) if at >= 0 else -1
    if brace < 0:
        return {}
    try:
        found, _ = _decoder.raw_decode(data[brace:].decode("utf-8", "replace"))
    except ValueError:
        return {}
    return found if isinstance(found, dict) else {}


def _count(value) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def tokens_in(head: bytes, tail: bytes) -> tuple[int, int]:
    """(input, output) tokens of a Messages answer: its `usage`, or a stream's first (message_start) and last
    (message_delta). Input counts the tokens read from a cache too."""
    first, last = _usage_in(head, first=True), _usage_in(tail)

    def total_input(found: dict) -> int:
        return sum(_count(found.get(name)) for name in ("input_tokens", "cache_read_input_tokens",
                                                        "cache_creation_input_tokens"))

    return total_input(last) or total_input(first), _count(last.get("output_tokens"))


def _text_of(content) -> str:
    """The text of a string or of a list of blocks (their text blocks, one per line)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(str(b.get("text", "")) for b in content if isinstance(b, dict) and b.get("type") == "text")
    return ""


def _image_part(block: dict) -> dict | None:
    source = block.get("source") or {}
    if source.get("type") == "base64":
        url = f"data:{source.get('media_type', 'image/png')};base64,{source.get('data', '')}"
    elif source.get("type") == "url":
        url = source.get("url", "")
    else:
        return None
    return {"type": "image_url", "image_url": {"url": url}}


def _chat_messages(message: dict) -> list[dict]:
    """One Anthropic message as chat messages: tool results become `tool` messages (first: they answer the
    assistant's calls just before), text and images the message, tool uses the assistant's `tool_calls`."""
    role, content = message["role"], message["content"]
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    out, texts, parts, calls = [], [], [], []
    for block in content:
        kind = block.get("type")
        if kind == "text":
            texts.append(str(block.get("text", "")))
            parts.append({"type": "text", "text": str(block.get("text", ""))})
        elif kind == "image" and (part := _image_part(block)) is not None:
            parts.append(part)
        elif kind == "tool_use":
            calls.append({"id": block.get("id") or f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                          "function": {"name": block.get("name", ""),
                                       "arguments": json.dumps(block.get("input") or {})}})
        elif kind == "tool_result":
            text = _text_of(block.get("content"))
            if block.get("is_error"):
                text = f"Error: {text}"
            out.append({"role": "tool", "tool_call_id": block.get("tool_use_id", ""), "content": text})
    if len(parts) > len(texts):  # an image: the parts as they are
        out.append({"role": role, "content": parts})
    elif texts or calls:
        out.append({"role": role, "content": "\n".join(texts) if texts else None})
    if calls:
        if not out or out[-1]["role"] != "assistant":
            out.append({"role": "assistant", "content": None})
        out[-1]["tool_calls"] = calls
    return out


def _tool_choice(choice: dict) -> object:
    kind = choice.get("type")
    if kind == "tool":
        return {"type": "function", "function": {"name": choice.get("name", "")}}
    return {"any": "required", "none": "none"}.get(kind, "auto")


def to_chat(fields: dict, model: str) -> dict:
    """A Messages request as a chat completion request."""
    chat_messages = []
    system = _text_of(fields.get("system"))
    if system:
        chat_messages.append({"role": "system", "content": system})
    for message in fields["messages"]:
        chat_messages.extend(_chat_messages(message))
    chat = {"model": model, "messages": chat_messages, "max_tokens": fields["max_tokens"]}
    for name in ("temperature", "top_p", "top_k"):
        if fields.get(name) is not None:
            chat[name] = fields[name]
    if fields.get("stop_sequences"):
        chat["stop"] = fields["stop_sequences"]
    if fields.get("stream"):
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}
    tools = [t for t in fields.get("tools") or [] if isinstance(t, dict) and t.get("name")]
    if tools:
        chat["tools"] = [{"type": "function", "function": {
            "name": t["name"], "description": t.get("description", ""),
            "parameters": t.get("input_schema") or {"type": "object", "properties": {}}}} for t in tools]
        if isinstance(fields.get("tool_choice"), dict):
            chat["tool_choice"] = _tool_choice(fields["tool_choice"])
    user = (fields.get("metadata") or {}).get("user_id") if isinstance(fields.get("metadata"), dict) else None
    if user:
        chat["user"] = str(user)
    return chat


def _stop(choice: dict, stop_sequences: list[str]) -> tuple[str, str | None]:
    """(stop_reason, stop_sequence) from a choice's finish_reason (and vLLM's `stop_reason`: the matched stop)."""
    matched = choice.get("stop_reason")
    if choice.get("finish_reason") == "stop" and isinstance(matched, str) and matched in stop_sequences:
        return "stop_sequence", matched
    return STOP_REASONS.get(choice.get("finish_reason"), "end_turn"), None


def _tool_input(arguments: str) -> dict:
    try:
        found = json.loads(arguments or "{}")
    except ValueError:
        return {}
    return found if isinstance(found, dict) else {}


def new_id() -> str:
    return f"msg_{uuid.uuid4().hex[:24]}"


def to_message(chat: dict, model: str, stop_sequences: list[str]) -> dict:
    """A chat completion as a Messages answer."""
    choice = chat["choices"][0]
    said = choice.get("message") or {}
    content = []
    if said.get("content"):
        content.append({"type": "text", "text": said["content"]})
    for call in said.get("tool_calls") or []:
        function = call.get("function") or {}
        content.append({"type": "tool_use", "id": call.get("id") or f"toolu_{uuid.uuid4().hex[:24]}",
                        "name": function.get("name", ""), "input": _tool_input(function.get("arguments", ""))})
    stop_reason, stop_sequence = _stop(choice, stop_sequences)
    counts = chat.get("usage") or {}
    return {"id": new_id(), "type": "message", "role": "assistant", "model": model, "content": content,
            "stop_reason": stop_reason, "stop_sequence": stop_sequence,
            "usage": {"input_tokens": _count(counts.get("prompt_tokens")),
                      "output_tokens": _count(counts.get("completion_tokens"))}}


def sse(kind: str, data: dict) -> bytes:
    return b"event: %s\ndata: %s\n\n" % (kind.encode(), json.dumps(data).encode())


class StreamTranslation:
    """A chat completion stream (SSE chunks, as they arrive) as Messages stream events: message_start, ping, one
    content block per text run and per tool call (start, deltas, stop), message_delta with the stop reason and
    usage, message_stop."""

    def __init__(self, model: str, stop_sequences: list[str]) -> None:
        self.model, self.stop_sequences = model, stop_sequences
        self.buffer = b""
        self.block = -1  # index of the open content block (-1: none yet)
        self.open_kind = ""  # "text" or "tool" while a block is open
        self.tools: dict[int, int] = {}  # the backend's tool call index → our block index
        self.stop_reason, self.stop_sequence = "end_turn", None
        self.input_tokens = self.output_tokens = 0
        self.error: dict | None = None
        self.broken = False

    def start(self) -> bytes:
        message = {"id": new_id(), "type": "message", "role": "assistant", "model": self.model, "content": [],
                   "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 0, "output_tokens": 0}}
        return sse("message_start", {"type": "message_start", "message": message}) + sse("ping", {"type": "ping"})

    def feed(self, data: bytes) -> bytes:
        self.buffer = (self.buffer + data).replace(b"\r\n", b"\n")
        out = []
        while (end := self.buffer.find(b"\n\n")) >= 0:
            event, self.buffer = self.buffer[:end], self.buffer[end + 2:]
            for line in event.split(b"\n"):
                if line.startswith(b"data:"):
                    out.append(self._on_data(line[5:].strip()))
        return b"".join(out)

    def _on_data(self, payload: bytes) -> bytes:
        if not payload or payload == b"[DONE]" or self.error is not None:
            return b""
        try:
            chunk = json.loads(payload)
        except ValueError:
            return b""
        if not isinstance(chunk, dict):
            return b""
        if "error" in chunk:
            self.error = error_body(500, backend_error_message(payload) or "The backend failed mid-answer.")
            return b""
        counts = chunk.get("usage")
        if isinstance(counts, dict):
            self.input_tokens = _count(counts.get("prompt_tokens")) or self.input_tokens
            self.output_tokens = _count(counts.get("completion_tokens")) or self.output_tokens
        out = []
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            if delta.get("content"):
                if self.open_kind != "text":
                    out.append(self._open({"type": "text", "text": ""}, "text"))
                out.append(sse("content_block_delta", {"type": "content_block_delta", "index": self.block,
                                                       "delta": {"type": "text_delta", "text": delta["content"]}}))
            for call in delta.get("tool_calls") or []:
                out.append(self._on_tool_call(call))
            if choice.get("finish_reason"):
                self.stop_reason, self.stop_sequence = _stop(choice, self.stop_sequences)
        return b"".join(out)

    def _on_tool_call(self, call: dict) -> bytes:
        out = []
        index = call.get("index", 0)
        function = call.get("function") or {}
        if index not in self.tools:
            block = {"type": "tool_use", "id": call.get("id") or f"toolu_{uuid.uuid4().hex[:24]}",
                     "name": function.get("name", ""), "input": {}}
            out.append(self._open(block, "tool"))
            self.tools[index] = self.block
        if function.get("arguments") and self.tools[index] == self.block:
            out.append(sse("content_block_delta", {"type": "content_block_delta", "index": self.block, "delta": {
                "type": "input_json_delta", "partial_json": function["arguments"]}}))
        return b"".join(out)

    def _open(self, block: dict, kind: str) -> bytes:
        closed = self._close()
        self.block += 1
        self.open_kind = kind
        return closed + sse("content_block_start", {"type": "content_block_start", "index": self.block,
                                                    "content_block": block})

    def _close(self) -> bytes:
        if not self.open_kind:
            return b""
        self.open_kind = ""
        return sse("content_block_stop", {"type": "content_block_stop", "index": self.block})

    def finish(self) -> bytes:
        """The closing events (or an error event, when the backend failed or broke off mid-answer)."""
        if self.error is None and self.broken:
            self.error = error_body(502, "The backend broke off its answer.")
        if self.error is not None:
            return self._close() + sse("error", self.error)
        return self._close() + sse("message_delta", {
            "type": "message_delta", "delta": {"stop_reason": self.stop_reason, "stop_sequence": self.stop_sequence},
            "usage": {"input_tokens": self.input_tokens, "output_tokens": self.output_tokens},
        }) + sse("message_stop", {"type": "message_stop"})
