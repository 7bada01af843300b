"""Rate limits through the real system and a real llama-server: a key allowed two requests a minute gets two answers,
then 429 with Retry-After; a stream whose client did not ask for usage is counted exactly as llama-server reports
it (the gateway asked for the usage and kept that chunk from the client)."""

import openai
import pytest

from tests.e2e.system import wait_until


def issue_key(system, name: str, **limits) -> dict:
    with system.client() as c:
        answer = c.post("/api/v1/keys", json={"name": name, "scope": "inference", **limits})
    assert answer.status_code == 201, answer.text
    return answer.json()


def test_a_key_over_its_requests_per_minute_gets_429_with_retry_after(system, deploy):
    model = deploy("rate-limited")
    system.wait_for_instances(model["id"], "running")
    key = issue_key(system, "two a minute", requests_per_minute=2)
    client = openai.OpenAI(base_url=f"{system.base_url}/v1", api_key=key["key"], max_retries=0)
    hello = [{"role": "user", "content": "hello"}]
    for _ in range(2):
        assert client.chat.completions.create(model="rate-limited", messages=hello, max_tokens=4).choices
    with pytest.raises(openai.RateLimitError) as refused:
        client.chat.completions.create(model="rate-limited", messages=hello, max_tokens=4)
    assert refused.value.status_code == 429
    assert 1 <= int(refused.value.response.headers["retry-after"]) <= 30  # one request back every 30 s
    assert "limited to 2 requests per minute" in refused.value.body["message"]
    assert refused.value.body["code"] == "rate_limit_exceeded"


def test_a_stream_is_counted_as_llama_server_reports_it(system, deploy):
    model = deploy("counted-streams")
    system.wait_for_instances(model["id"], "running")
    asked, silent = issue_key(system, "asks for usage"), issue_key(system, "does not ask")
    request = {"model": "counted-streams", "messages": [{"role": "user", "content": "Tell me a story about a cat."}],
               "max_tokens": 12, "temperature": 0, "seed": 7, "stream": True}

    # The same request twice: first by a client that asks for usage (llama-server's own count reaches it)...
    chunks = list(openai.OpenAI(base_url=f"{system.base_url}/v1", api_key=asked["key"], max_retries=0)
                  .chat.completions.create(**request, stream_options={"include_usage": True}))
    reported = chunks[-1].usage
    assert chunks[-1].choices == [] and reported.prompt_tokens > 0 and reported.completion_tokens > 0
    # ...then by one that does not: it sees no usage, though the prompt now comes from llama-server's cache (whose
    # `timings` would count only the uncached tokens).
    chunks = list(openai.OpenAI(base_url=f"{system.base_url}/v1", api_key=silent["key"], max_retries=0)
                  .chat.completions.create(**request))
    assert all(chunk.usage is None for chunk in chunks)
    assert all(chunk.choices for chunk in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks)

    with system.client() as c:
        def counted(key):
            rows = c.get("/api/v1/keys/usage", params={"key": key["id"]}).json()["models"]
            return rows[0] if rows and rows[0]["requests"] >= 1 else None

        for key in (asked, silent):
            row = wait_until(lambda key=key: counted(key), 60, "the usage to be written", interval=0.5)
            assert (row["prompt_tokens"], row["completion_tokens"]) == \
                (reported.prompt_tokens, reported.completion_tokens), key["name"]
