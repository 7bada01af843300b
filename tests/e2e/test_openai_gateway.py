"""An OpenAI client talks to tiny llama.cpp models deployed through the API, via our gateway."""

import httpx
import openai
import psutil
import pytest


@pytest.fixture(scope="module")
def deployed(system, tiny_models):
    with system.client() as c:
        chat = c.post("/api/v1/models", json={"name": "tiny-chat", "source": "local_path",
                                              "local_path": str(tiny_models["chat"]), "replicas": 2,
                                              "backend_parameters": ["--ctx-size", "512"]})
        assert chat.status_code == 201, chat.text
        embed = c.post("/api/v1/models", json={"name": "tiny-embed", "source": "local_path",
                                               "local_path": str(tiny_models["embed"]), "replicas": 1,
                                               "backend_parameters": ["--ctx-size=512"]})
        assert embed.status_code == 201, embed.text
        idle = c.post("/api/v1/models", json={"name": "idle-model", "source": "local_path",
                                              "local_path": str(tiny_models["chat"]), "replicas": 0})
        assert idle.status_code == 201, idle.text
    system.wait_for_instances(chat.json()["id"], "running", count=2)
    system.wait_for_instances(embed.json()["id"], "running")
    return {"chat": chat.json(), "embed": embed.json()}


@pytest.fixture
def client(system, deployed):
    return openai.OpenAI(base_url=f"{system.base_url}/v1", api_key=system.api_key, max_retries=0)


def test_chat_completion_answers(client):
    reply = client.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": "hello"}],
                                           max_tokens=8)
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content
    assert reply.usage.completion_tokens > 0


def test_streamed_chat_arrives_in_chunks(client):
    stream = client.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": "hello"}],
                                            max_tokens=8, stream=True)
    pieces = [chunk.choices[0].delta.content for chunk in stream if chunk.choices and chunk.choices[0].delta.content]
    assert len(pieces) >= 2
    assert "".join(pieces)


def test_completion_answers(client):
    reply = client.completions.create(model="tiny-chat", prompt="Once upon a time", max_tokens=8)
    assert reply.choices[0].text


def test_embeddings_have_the_model_width(client):
    reply = client.embeddings.create(model="tiny-embed", input=["hello", "world"])
    assert len(reply.data) == 2
    assert len(reply.data[0].embedding) == 64
    assert reply.data[0].embedding != reply.data[1].embedding


def test_models_list_names_every_model(client):
    names = {m.id for m in client.models.list()}
    assert {"tiny-chat", "tiny-embed", "idle-model"} <= names


def test_both_replicas_serve_requests(system, deployed, client):
    for _ in range(4):
        client.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    with system.client() as c:
        instances = c.get(f"/api/v1/models/{deployed['chat']['id']}/instances").json()
    assert len({i["port"] for i in instances}) == 2
    for instance in instances:  # each llama-server counts the requests it served (asked with its own key)
        key = psutil.Process(instance["pid"]).environ()["LLAMA_API_KEY"]
        metrics = httpx.get(f"http://127.0.0.1:{instance['port']}/slots", timeout=5,
                            headers={"Authorization": f"Bearer {key}"}).json()
        assert any(slot.get("id_task", -1) >= 0 for slot in metrics), metrics


def test_a_backend_port_answers_only_the_gateway(system, deployed):
    with system.client() as c:
        [instance, _] = c.get(f"/api/v1/models/{deployed['chat']['id']}/instances").json()
    direct = f"http://127.0.0.1:{instance['port']}/v1/chat/completions"
    body = {"model": "tiny-chat", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
    assert httpx.post(direct, json=body, timeout=10).status_code == 401
    assert httpx.post(direct, json=body, timeout=10, headers={"Authorization": f"Bearer {system.api_key}"}) \
        .status_code == 401  # a user's key is the gateway's business, not the backend's
    assert "backend_api_key" not in instance


def test_missing_key_is_401_in_openai_shape(system, deployed):
    anonymous = openai.OpenAI(base_url=f"{system.base_url}/v1", api_key="not-a-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        anonymous.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.status_code == 401
    raw = httpx.post(f"{system.base_url}/v1/chat/completions", json={"model": "tiny-chat"})
    assert raw.status_code == 401
    assert set(raw.json()["error"]) == {"message", "type", "code"}


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.body["code"] == "model_not_found"


def test_model_without_running_instance_is_503(client):
    with pytest.raises(openai.InternalServerError) as caught:
        client.chat.completions.create(model="idle-model", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.status_code == 503
    assert "no running instance" in caught.value.body["message"]
