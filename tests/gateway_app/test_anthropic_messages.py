"""Anthropic's Messages API at /v1/messages, spoken by the real `anthropic` client to the gateway served by uvicorn:
passed through to llama-server (which speaks it), translated to and from chat completions for vLLM, streamed and
not; errors in Anthropic's shape; the key in `x-api-key` or `Authorization: Bearer`; tokens counted."""

import json
from contextlib import asynccontextmanager

import anthropic
import httpx
import pytest
from asgiref.sync import async_to_sync

from gateway_app.anthropic import StreamTranslation
from gateway_app.models import ApiKey, Usage
from gateway_app.proxy import flush_usage
from tests.gateway_app.fake_backend import FakeBackend, free_port, serving, uvicorn_serving

pytestmark = pytest.mark.django_db
HELLO = [{"role": "user", "content": "hi"}]


@pytest.fixture
def key(admin_user) -> str:
    return ApiKey.issue(admin_user, "claude", scope="inference")[1]


@asynccontextmanager
async def gateway(key: str | None = None, **client_args):
    """The gateway served by uvicorn, and an Anthropic client pointed at it."""
    async with uvicorn_serving() as url, anthropic.AsyncAnthropic(base_url=url, api_key=key, max_retries=0,
                                                                   **client_args) as client:
        yield client


def test_llama_server_answers_in_its_own_messages_api(key):
    backend = FakeBackend()

    @async_to_sync
    async def run():
        async with serving("tiny", backend), gateway(key) as client:
            plain = await client.messages.create(model="tiny", max_tokens=16, messages=HELLO)
            async with client.messages.stream(model="tiny", max_tokens=16, messages=HELLO) as stream:
                text = "".join([piece async for piece in stream.text_stream])
                final = await stream.get_final_message()
            await flush_usage()
        return plain, text, final

    plain, text, final = run()
    assert plain.content[0].text == "hi" and plain.stop_reason == "end_turn"
    assert (plain.usage.input_tokens, plain.usage.output_tokens) == (4, 7)
    assert text == "piece 0 piece 1 piece 2 "
    assert final.content[0].text == text and final.stop_reason == "end_turn"
    assert (final.usage.input_tokens, final.usage.output_tokens) == (4, 3)
    assert [r["path"] for r in backend.received] == ["/v1/messages", "/v1/messages"]
    sent = backend.received[0]
    assert json.loads(sent["body"]) == {"model": "tiny", "max_tokens": 16, "messages": HELLO}
    assert sent["headers"]["authorization"] == "Bearer secret-tiny-0"  # the instance's secret, not the user's key
    assert "x-api-key" not in sent["headers"]
    # Input counts the tokens llama-server read from its cache (1 of 5).
    assert Usage.objects.values_list("requests", "prompt_tokens", "completion_tokens").get() == (2, 10, 10)


def test_vllm_is_asked_in_chat_completions_and_answers_as_a_message(key):
    backend = FakeBackend(answer={"id": "chatcmpl-1", "object": "chat.completion",
                                  "choices": [{"index": 0, "finish_reason": "stop", "stop_reason": "END",
                                               "message": {"role": "assistant", "content": "hello there"}}],
                                  "usage": {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}})

    @async_to_sync
    async def run():
        async with serving("big", backend, backend="vllm"), gateway(key) as client:
            reply = await client.messages.create(
                model="big", max_tokens=20, system=[{"type": "text", "text": "Be brief."}], stop_sequences=["END"],
                extra_body={"temperature": 0.5, "top_p": 0.9},  # older clients' fields (this one lacks them)
                messages=[{"role": "user", "content": [{"type": "text", "text": "hi"}]},
                          {"role": "assistant", "content": "hello"}, {"role": "user", "content": "again"}])
            await flush_usage()
            return reply

    reply = run()
    assert backend.received[0]["path"] == "/v1/chat/completions"
    assert json.loads(backend.received[0]["body"]) == {
        "model": "big", "max_tokens": 20, "temperature": 0.5, "top_p": 0.9, "stop": ["END"],
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                     {"role": "assistant", "content": "hello"}, {"role": "user", "content": "again"}]}
    assert reply.id.startswith("msg_") and reply.type == "message" and reply.role == "assistant"
    assert [(b.type, b.text) for b in reply.content] == [("text", "hello there")]
    assert (reply.stop_reason, reply.stop_sequence) == ("stop_sequence", "END")
    assert (reply.usage.input_tokens, reply.usage.output_tokens) == (9, 2)
    assert Usage.objects.values_list("requests", "prompt_tokens", "completion_tokens").get() == (1, 9, 2)


def test_a_vllm_stream_arrives_as_message_events_with_usage(key):
    pieces = [{"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
              *({"choices": [{"index": 0, "delta": {"content": word}}]} for word in ("Once ", "upon ", "a time")),
              {"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]}]
    backend = FakeBackend(stream_events=pieces)

    @async_to_sync
    async def run():
        async with serving("big", backend, backend="vllm"), gateway(key) as client:
            kinds = []
            async with client.messages.stream(model="big", max_tokens=3, messages=HELLO) as stream:
                async for event in stream:
                    kinds.append(event.type)
                final = await stream.get_final_message()
            await flush_usage()
            return kinds, final

    kinds, final = run()
    assert json.loads(backend.received[0]["body"])["stream_options"] == {"include_usage": True}
    assert final.content[0].text == "Once upon a time"
    assert final.stop_reason == "max_tokens"
    assert (final.usage.input_tokens, final.usage.output_tokens) == (5, 7)  # from the backend's usage chunk
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert {"content_block_start", "content_block_stop", "message_delta"} <= set(kinds)
    assert Usage.objects.values_list("prompt_tokens", "completion_tokens").get() == (5, 7)


def test_tools_are_translated_both_ways_for_vllm(key):
    call = {"id": "call_9", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}
    backend = FakeBackend(answer={"choices": [{"finish_reason": "tool_calls", "message": {
        "role": "assistant", "content": None, "tool_calls": [call]}}], "usage": {"prompt_tokens": 30,
                                                                                   "completion_tokens": 8}})
    tools = [{"name": "weather", "description": "Weather in a city",
              "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}]
    history = [{"role": "user", "content": "Weather in Rome?"},
               {"role": "assistant", "content": [{"type": "text", "text": "Let me look."},
                                                 {"type": "tool_use", "id": "toolu_1", "name": "weather",
                                                  "input": {"city": "Rome"}}]},
               {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "Sunny"},
                                            {"type": "text", "text": "And Oslo?"}]}]

    @async_to_sync
    async def run():
        async with serving("big", backend, backend="vllm"), gateway(key) as client:
            return await client.messages.create(model="big", max_tokens=50, tools=tools, messages=history,
                                                tool_choice={"type": "any"})

    reply = run()
    sent = json.loads(backend.received[0]["body"])
    assert sent["tools"] == [{"type": "function", "function": {
        "name": "weather", "description": "Weather in a city", "parameters": tools[0]["input_schema"]}}]
    assert sent["tool_choice"] == "required"
    assert sent["messages"] == [
        {"role": "user", "content": "Weather in Rome?"},
        {"role": "assistant", "content": "Let me look.", "tool_calls": [
            {"id": "toolu_1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Rome"}'}}]},
        {"role": "tool", "tool_call_id": "toolu_1", "content": "Sunny"},
        {"role": "user", "content": "And Oslo?"}]
    assert reply.stop_reason == "tool_use"
    [used] = reply.content
    assert (used.type, used.id, used.name, used.input) == ("tool_use", "call_9", "weather", {"city": "Oslo"})


def test_a_streamed_tool_call_becomes_a_tool_use_block():
    chunks = [{"choices": [{"index": 0, "delta": {"content": "Checking."}}]},
              {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                                                  "function": {"name": "weather",
                                                                               "arguments": ""}}]}}]},
              {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0,
                                                                  "function": {"arguments": '{"city": '}}]}}]},
              {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": '"Oslo"}'}}]},
                            "finish_reason": "tool_calls"}]},
              {"choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 6}}]
    translation = StreamTranslation("big", [])
    raw = translation.start() + b"".join(translation.feed(f"data: {json.dumps(c)}\n\n".encode()) for c in chunks)
    raw += translation.feed(b"data: [DONE]\n\n") + translation.finish()
    events = [json.loads(line[6:]) for line in raw.decode().splitlines() if line.startswith("data: ")]
    starts = [e["content_block"] for e in events if e["type"] == "content_block_start"]
    assert starts == [{"type": "text", "text": ""},
                      {"type": "tool_use", "id": "call_1", "name": "weather", "input": {}}]
    arguments = "".join(e["delta"]["partial_json"] for e in events if e["type"] == "content_block_delta"
                        and e["delta"]["type"] == "input_json_delta" and e["index"] == 1)
    assert json.loads(arguments) == {"city": "Oslo"}
    assert [e["index"] for e in events if e["type"] == "content_block_stop"] == [0, 1]
    [delta] = [e for e in events if e["type"] == "message_delta"]
    assert delta["delta"]["stop_reason"] == "tool_use"
    assert delta["usage"] == {"input_tokens": 12, "output_tokens": 6}
    assert events[-1] == {"type": "message_stop"}


def test_errors_come_in_anthropics_shape(key):
    refusing = FakeBackend(refuse_with=400)

    @async_to_sync
    async def run():
        caught = {}
        async with serving("tiny", refusing), serving("gone", free_port()), gateway(key) as client:
            for name, model, error in (("unknown", "nope", anthropic.NotFoundError),
                                       ("backend", "tiny", anthropic.BadRequestError),
                                       ("unreachable", "gone", anthropic.InternalServerError)):
                try:
                    await client.messages.create(model=model, max_tokens=8, messages=HELLO)
                except error as exc:
                    caught[name] = exc
            async with gateway("not-a-key") as stranger:
                try:
                    await stranger.messages.create(model="tiny", max_tokens=8, messages=HELLO)
                except anthropic.AuthenticationError as exc:
                    caught["key"] = exc
            raw = httpx.AsyncClient(base_url=str(client.base_url), headers={"x-api-key": key})
            async with raw:
                caught["max_tokens"] = await raw.post("/v1/messages", json={"model": "tiny", "messages": HELLO})
                caught["role"] = await raw.post("/v1/messages", json={
                    "model": "tiny", "max_tokens": 5, "messages": [{"role": "system", "content": "x"}]})
                caught["image"] = await raw.post("/v1/messages", json={
                    "model": "tiny", "max_tokens": 5, "messages": [{"role": "user", "content": [
                        {"type": "image", "source": "not-an-object"}]}]})
        return caught

    caught = run()
    assert caught["unknown"].status_code == 404
    assert caught["unknown"].body == {"type": "error", "error": {"type": "not_found_error",
                                                                 "message": "The model 'nope' does not exist."}}
    assert caught["backend"].status_code == 400
    assert caught["backend"].body["error"] == {"type": "invalid_request_error", "message": "the fake backend refuses"}
    assert caught["unreachable"].status_code == 502
    assert caught["unreachable"].body["error"]["type"] == "api_error"
    assert caught["key"].status_code == 401
    assert caught["key"].body["error"]["type"] == "authentication_error"
    assert caught["max_tokens"].status_code == 400
    assert caught["max_tokens"].json() == {"type": "error", "error": {
        "type": "invalid_request_error", "message": "The 'max_tokens' field is required."}}
    assert caught["role"].json()["error"]["message"] == "messages.0.role must be 'user' or 'assistant', not 'system'."
    assert caught["image"].status_code == 400  # a block it cannot read: the client's mistake, not a 500
    assert caught["image"].json()["error"]["type"] == "invalid_request_error"


def test_a_model_with_no_running_instance_is_503_overloaded(key):
    @async_to_sync
    async def run():
        async with serving("idle"), gateway(key) as client:
            with pytest.raises(anthropic.InternalServerError) as caught:
                await client.messages.create(model="idle", max_tokens=8, messages=HELLO)
            return caught.value

    refused = run()
    assert refused.status_code == 503
    assert refused.body["error"]["type"] == "overloaded_error"
    assert "no running instance" in refused.body["error"]["message"]


def test_the_key_may_come_as_x_api_key_or_bearer_on_every_route(key):
    backend = FakeBackend()

    @async_to_sync
    async def run():
        async with serving("tiny", backend), gateway(auth_token=key) as bearer:
            reply = await bearer.messages.create(model="tiny", max_tokens=8, messages=HELLO)
            async with httpx.AsyncClient(base_url=str(bearer.base_url)) as raw:
                listed = await raw.get("/v1/models", headers={"x-api-key": key})
                chat = await raw.post("/v1/chat/completions", headers={"x-api-key": key},
                                      json={"model": "tiny", "messages": HELLO})
                anonymous = await raw.get("/v1/models", headers={"x-api-key": ""})
        return reply, listed, chat, anonymous

    reply, listed, chat, anonymous = run()
    assert reply.content[0].text == "hi"
    assert [m["id"] for m in listed.json()["data"]] == ["tiny"]
    assert chat.status_code == 200 and chat.json()["choices"][0]["message"]["content"] == "hi"
    assert anonymous.status_code == 401
    assert all("x-api-key" not in r["headers"] for r in backend.received)


def test_limits_refuse_in_anthropics_shape(admin_user, redis_url):
    _, limited = ApiKey.issue(admin_user, "one-a-minute", requests_per_minute=1, allowed_models=["tiny"])

    @async_to_sync
    async def run():
        async with serving("tiny", FakeBackend()), serving("other", FakeBackend()), gateway(limited) as client:
            await client.messages.create(model="tiny", max_tokens=8, messages=HELLO)
            with pytest.raises(anthropic.RateLimitError) as limited_out:
                await client.messages.create(model="tiny", max_tokens=8, messages=HELLO)
            with pytest.raises(anthropic.PermissionDeniedError) as not_allowed:
                await client.messages.create(model="other", max_tokens=8, messages=HELLO)
            return limited_out.value, not_allowed.value

    limited_out, not_allowed = run()
    assert limited_out.body["error"]["type"] == "rate_limit_error"
    assert int(limited_out.response.headers["retry-after"]) >= 1
    assert not_allowed.body == {"type": "error", "error": {
        "type": "permission_error", "message": "API key 'one-a-minute' may not call the model 'other'."}}
