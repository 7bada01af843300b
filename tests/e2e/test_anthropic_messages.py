"""The `anthropic` client talks to a tiny llama.cpp model through our gateway's /v1/messages (llama-server's own
Messages API behind it): a plain answer, a stream, and errors in Anthropic's shape."""

import anthropic
import pytest

from tests.e2e.system import wait_until


def test_the_anthropic_client_chats_streams_and_gets_anthropic_errors(system, deploy, inference_key):
    model = deploy("claude-tiny")
    system.wait_for_instances(model["id"], "running")
    client = anthropic.Anthropic(base_url=system.base_url, api_key=inference_key["key"], max_retries=0)
    hello = [{"role": "user", "content": "Hello"}]

    reply = client.messages.create(model="claude-tiny", max_tokens=8, system="Answer briefly.", messages=hello)
    assert reply.type == "message" and reply.role == "assistant"
    assert reply.content[0].type == "text" and reply.content[0].text
    assert reply.stop_reason in ("end_turn", "max_tokens")
    assert reply.usage.input_tokens > 0 and 0 < reply.usage.output_tokens <= 8

    with client.messages.stream(model="claude-tiny", max_tokens=8, messages=hello) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert len(pieces) >= 2
    assert final.content[0].text == "".join(pieces)
    assert final.usage.input_tokens > 0 and 0 < final.usage.output_tokens <= 8

    with pytest.raises(anthropic.NotFoundError) as unknown:
        client.messages.create(model="no-such-model", max_tokens=8, messages=hello)
    assert unknown.value.body["type"] == "error"
    assert unknown.value.body["error"]["type"] == "not_found_error"
    stranger = anthropic.Anthropic(base_url=system.base_url, api_key="not-a-key", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as refused:
        stranger.messages.create(model="claude-tiny", max_tokens=8, messages=hello)
    assert refused.value.body["error"]["type"] == "authentication_error"

    with system.client() as c:  # the two answers' tokens counted for the key, as llama-server reported them
        def counted():
            rows = c.get("/api/v1/keys/usage", params={"key": inference_key["id"]}).json()["models"]
            return rows if rows and rows[0]["requests"] >= 2 else None

        [row] = wait_until(counted, 60, "the usage to be written", interval=0.5)
    assert row["model"] == "claude-tiny"
    assert row["prompt_tokens"] >= reply.usage.input_tokens + final.usage.input_tokens
    assert row["completion_tokens"] == reply.usage.output_tokens + final.usage.output_tokens
