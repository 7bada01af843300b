"""A key limited to some models: any other model is refused 403 (a model that does not exist too: such a key learns
nothing of the others), and its /v1/models lists only the models it may call."""

import json

import pytest
from asgiref.sync import async_to_sync

from gateway_app import tables
from gateway_app.models import ApiKey
from tests.gateway_app.fake_backend import APP, CHAT, FakeBackend, call, deploy, serving

pytestmark = pytest.mark.django_db


def test_a_key_calls_only_its_models_and_lists_only_them(admin_user):
    _, limited = ApiKey.issue(admin_user, "only-tiny", allowed_models=["tiny"])
    ApiKey.issue(admin_user, "also-only-tiny", allowed_models=["tiny"])
    _, everything = ApiKey.issue(admin_user, "all")
    deploy("other", [])

    @async_to_sync
    async def run():
        async with serving("tiny", FakeBackend()):
            return {name: await call(APP, *request, key=key, json_body=body)
                    for name, key, request, body in (
                        ("tiny", limited, ("POST", "/v1/chat/completions"), CHAT),
                        ("other", limited, ("POST", "/v1/chat/completions"), {**CHAT, "model": "other"}),
                        ("ghost", limited, ("POST", "/v1/chat/completions"), {**CHAT, "model": "ghost"}),
                        ("ghost, any key", everything, ("POST", "/v1/chat/completions"), {**CHAT, "model": "ghost"}),
                        ("listed", limited, ("GET", "/v1/models"), None),
                        ("listed, any key", everything, ("GET", "/v1/models"), None))}

    answers = run()
    assert answers["tiny"]["status"] == 200
    for name in ("other", "ghost"):
        assert answers[name]["status"] == 403
        error = json.loads(answers[name]["body"])["error"]
        assert error["code"] == "model_not_allowed"
        assert error["message"] == f"API key 'only-tiny' may not call the model '{name}'."
    assert answers["ghost, any key"]["status"] == 404
    assert [m["id"] for m in json.loads(answers["listed"]["body"])["data"]] == ["tiny"]
    assert [m["id"] for m in json.loads(answers["listed, any key"]["body"])["data"]] == ["other", "tiny"]
    bodies = {id(key.models_body) for key in tables.TABLES.snapshot.keys.values() if key.models_body is not None}
    assert len(bodies) == 1  # rendered once per list of allowed models, not per key
