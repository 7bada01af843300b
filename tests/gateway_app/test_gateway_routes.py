"""The /v1 routes answer as OpenAI's do: a key is required, bodies are checked, unknown models and models without a
running instance are told apart; the backend gets its own instance's secret, never the client's key."""

import json

import pytest
from asgiref.sync import async_to_sync

from gateway_app.models import ApiKey
from models_app.models import Model
from tests.gateway_app.fake_backend import APP as app
from tests.gateway_app.fake_backend import CHAT, FakeBackend, call, deploy, serving

pytestmark = pytest.mark.django_db


def test_refusals_come_in_openai_shape(admin_user):
    key = ApiKey.issue(admin_user, "k")[1]
    Model.objects.create(name="idle", source="local_path", local_path="/m.gguf", replicas=0)

    @async_to_sync
    async def run():
        return {
            "no key": await call(app, "POST", "/v1/chat/completions", json_body=CHAT),
            "wrong key": await call(app, "POST", "/v1/chat/completions", key="aimind-nope", json_body=CHAT),
            "form": await call(app, "POST", "/v1/chat/completions", key=key, body=b"model=tiny",
                               headers={"content-type": "application/x-www-form-urlencoded"}),
            "json upload": await call(app, "POST", "/v1/audio/transcriptions", key=key, json_body=CHAT),
            "not json": await call(app, "POST", "/v1/chat/completions", key=key, body=b"{nope"),
            "a list": await call(app, "POST", "/v1/chat/completions", key=key, json_body=[CHAT]),
            "no model": await call(app, "POST", "/v1/chat/completions", key=key, json_body={"messages": []}),
            "unknown": await call(app, "POST", "/v1/chat/completions", key=key, json_body=CHAT),
            "idle": await call(app, "POST", "/v1/chat/completions", key=key, json_body={**CHAT, "model": "idle"}),
            "get": await call(app, "GET", "/v1/chat/completions", key=key),
            "other path": await call(app, "POST", "/v1/nothing-here", key=key, json_body=CHAT),
        }

    answers = run()
    expected = {"no key": (401, "invalid_api_key"), "wrong key": (401, "invalid_api_key"),
                "form": (415, "unsupported_media_type"), "json upload": (415, "unsupported_media_type"),
                "not json": (400, "invalid_body"), "a list": (400, "invalid_body"), "no model": (400, "model_required"),
                "unknown": (404, "model_not_found"), "idle": (503, "no_running_instance")}
    for case, (status, code) in expected.items():
        answer = answers[case]
        assert answer["status"] == status, (case, answer)
        assert set(json.loads(answer["body"])["error"]) == {"message", "type", "code"}
        assert json.loads(answer["body"])["error"]["code"] == code, case
        assert answer["headers"]["content-type"] == "application/json"
    assert answers["no key"]["headers"]["www-authenticate"] == 'Bearer realm="gateway"'
    assert answers["get"]["status"] == 405 and answers["get"]["headers"]["allow"] == "POST"
    assert answers["other path"]["body"] == b"not found"  # Django's to answer


def test_the_backend_gets_its_instances_secret_and_the_client_the_answer(admin_user):
    key = ApiKey.issue(admin_user, "k")[1]

    @async_to_sync
    async def run():
        backend = FakeBackend()
        async with serving("tiny", backend):
            answer = await call(app, "POST", "/v1/chat/completions", key=key, json_body=CHAT,
                                headers={"x-request-id": "r1", "accept-encoding": "gzip"})
        return answer, backend.received

    answer, received = run()
    assert answer["status"] == 200
    assert json.loads(answer["body"])["choices"][0]["message"]["content"] == "hi"
    assert answer["headers"]["content-type"] == "application/json; charset=utf-8"
    assert answer["headers"]["x-content-type-options"] == "nosniff" and "server" not in answer["headers"]
    [request] = received
    assert request["path"] == "/v1/chat/completions"
    assert request["headers"]["authorization"] == "Bearer secret-tiny-0"
    assert request["headers"]["x-request-id"] == "r1" and "accept-encoding" not in request["headers"]
    assert json.loads(request["body"]) == CHAT


def test_models_list_names_every_model_with_its_running_replicas(admin_user):
    key = ApiKey.issue(admin_user, "k")[1]
    deploy("two", [40001, 40002])
    Model.objects.create(name="idle", source="local_path", local_path="/m.gguf", replicas=0)
    answer = async_to_sync(call)(app, "GET", "/v1/models", key=key)
    assert answer["status"] == 200
    listed = {m["id"]: m for m in json.loads(answer["body"])["data"]}
    assert listed["two"]["ready_replicas"] == 2 and listed["idle"]["ready_replicas"] == 0
    assert listed["two"]["object"] == "model" and listed["two"]["owned_by"] == "aimind"


def test_an_upload_passes_through_whole_and_vox_box_errors_get_their_real_status(admin_user):
    key = ApiKey.issue(admin_user, "k")[1]
    boundary = "b0undary"
    form = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n"
            f"Content-Type: audio/wav\r\n\r\n").encode() + bytes(range(256)) * 64 + f"\r\n--{boundary}--\r\n".encode()
    content_type = f"multipart/form-data; boundary={boundary}"

    @async_to_sync
    async def run():
        backend = FakeBackend(answer={"status_code": 400, "detail": "the file is no audio"})
        async with serving("whisper", backend, backend="vox-box"):
            answer = await call(app, "POST", "/v1/audio/transcriptions", key=key, body=form,
                                headers={"content-type": content_type})
            broken = await call(app, "POST", "/v1/audio/transcriptions", key=key, body=b"--nope",
                                headers={"content-type": content_type})
        return answer, broken, backend.received

    answer, broken, [received] = run()
    assert received["body"] == form and received["headers"]["content-type"] == content_type
    assert "authorization" not in received["headers"]  # vox-box has no secret of its own
    assert answer["status"] == 400
    assert json.loads(answer["body"])["error"] == {"message": "the file is no audio", "type": "invalid_request_error",
                                                   "code": "backend_error"}
    assert broken["status"] == 400 and json.loads(broken["body"])["error"]["code"] in ("invalid_body",
                                                                                        "model_required")
