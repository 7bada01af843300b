"""GET /api/v1/sources/<hub>/models and /files against the stand-in hubs: search (GGUF filter), files grouped by
quantization, and hub failures as 404 / 403 / 502 with the hub's message."""


import pytest

from tests.fixtures.hubs import (
    point_clients_at,
    record_sleeps,
    start_both,
    start_huggingface,
    start_modelscope,
    stop_all,
)

pytestmark = pytest.mark.django_db

HUBS = ("huggingface", "modelscope")
GGUF_REPO = {
    "README.md": b"# Model\n",
    "config.json": b'{"architectures": ["LlamaForCausalLM"]}',
    "Model-Q4_K_M.gguf": b"GGUF" + bytes(4000),
    "Model-Q8_0.gguf": b"GGUF" + bytes(8000),
    "Model-F16-00001-of-00003.gguf": b"GGUF" + bytes(6000),
    "Model-F16-00002-of-00003.gguf": bytes(6000),
    "Model-F16-00003-of-00003.gguf": bytes(3000),
    "mmproj-model-f16.gguf": b"GGUF" + bytes(600),
}


@pytest.fixture(scope="module")
def hubs():
    started = start_both()
    for hub in started.values():
        hub.add_repo("acme/Llama-3-8B-Instruct-GGUF", GGUF_REPO, downloads=900, likes=40, tags=["llama"])
        hub.add_repo("acme/Llama-3-8B-Instruct", {"config.json": b"{}", "model.safetensors": bytes(100)},
                     downloads=5000, likes=300, tags=["llama", "safetensors"])
        hub.add_repo("acme/Mistral-7B-GGUF", {"m-Q4_0.gguf": b"GGUF"})
        hub.add_repo("meta/Llama-Guard-GGUF", {"guard-Q8_0.gguf": b"GGUF" + bytes(10)}, gated=True)
    yield started
    stop_all(started)


@pytest.fixture
def env(hubs, monkeypatch):
    return point_clients_at(hubs, monkeypatch)


@pytest.mark.parametrize("hub", HUBS)
def test_search_returns_matching_repos_with_stats(api, env, hub):
    response = api.get(f"/api/v1/sources/{hub}/models", {"search": "llama-3"})
    assert response.status_code == 200, response.json()
    body = response.json()
    assert body["hub"] == hub and body["elapsed_ms"] >= 0
    results = {r["id"]: r for r in body["results"]}
    assert set(results) == {"acme/Llama-3-8B-Instruct-GGUF", "acme/Llama-3-8B-Instruct"}
    gguf = results["acme/Llama-3-8B-Instruct-GGUF"]
    assert (gguf["downloads"], gguf["likes"], gguf["gguf"]) == (900, 40, True)
    assert "llama" in gguf["tags"]
    assert results["acme/Llama-3-8B-Instruct"]["gguf"] is False


@pytest.mark.parametrize("hub", HUBS)
def test_search_with_gguf_filter_keeps_gguf_repos(api, env, hub):
    response = api.get(f"/api/v1/sources/{hub}/models", {"search": "llama", "gguf": "true"})
    assert response.status_code == 200, response.json()
    ids = sorted(r["id"] for r in response.json()["results"])
    assert ids == ["acme/Llama-3-8B-Instruct-GGUF", "meta/Llama-Guard-GGUF"]
    assert all(r["gguf"] for r in response.json()["results"])
    assert [r["gated"] for r in response.json()["results"] if r["id"] == "meta/Llama-Guard-GGUF"] == [True]


@pytest.mark.parametrize("hub", HUBS)
def test_search_limit(api, env, hub):
    response = api.get(f"/api/v1/sources/{hub}/models", {"search": "", "limit": 2})
    ids = [r["id"] for r in response.json()["results"]]
    assert ids == ["acme/Llama-3-8B-Instruct", "acme/Llama-3-8B-Instruct-GGUF"]  # most downloaded first


@pytest.mark.parametrize("hub", HUBS)
def test_files_are_listed_and_grouped_by_quantization(api, env, hub):
    response = api.get(f"/api/v1/sources/{hub}/files", {"repo": "acme/Llama-3-8B-Instruct-GGUF"})
    assert response.status_code == 200, response.json()
    body = response.json()
    assert body["hub"] == hub and body["elapsed_ms"] >= 0
    assert {f["path"]: f["size"] for f in body["files"]} == {p: len(d) for p, d in GGUF_REPO.items()}
    assert body["total_size"] == sum(len(d) for d in GGUF_REPO.values())
    groups = {(g["quantization"], g["mmproj"]): g for g in body["groups"]["gguf"]}
    assert set(groups) == {("Q4_K_M", False), ("Q8_0", False), ("F16", False), ("F16", True)}
    split = groups[("F16", False)]
    assert split["split"] and split["size"] == 6004 + 6000 + 3000 and len(split["files"]) == 3
    assert groups[("F16", True)]["files"] == ["mmproj-model-f16.gguf"]
    assert {o["path"] for o in body["groups"]["other"]} == {"README.md", "config.json"}


@pytest.mark.parametrize("hub", HUBS)
def test_missing_repo_is_404_with_the_hubs_message(api, env, hub):
    response = api.get(f"/api/v1/sources/{hub}/files", {"repo": "acme/no-such-model"})
    assert response.status_code == 404
    assert response.json()["hub"] == hub
    assert "not found" in response.json()["detail"].lower()


@pytest.mark.parametrize("hub", HUBS)
def test_gated_repo_is_403_with_the_hubs_message(api, env, hub):
    response = api.get(f"/api/v1/sources/{hub}/files", {"repo": "meta/Llama-Guard-GGUF"})
    assert response.status_code == 403
    assert response.json()["hub"] == hub
    assert "gated" in response.json()["detail"].lower() or "restricted" in response.json()["detail"].lower()


def test_gated_repo_is_listed_with_an_accepted_hf_token(api, env, monkeypatch):
    env["huggingface"].tokens.add("hf_good")
    monkeypatch.setenv("HF_TOKEN", "hf_good")
    response = api.get("/api/v1/sources/huggingface/files", {"repo": "meta/Llama-Guard-GGUF"})
    assert response.status_code == 200, response.json()
    assert [f["path"] for f in response.json()["files"]] == ["guard-Q8_0.gguf"]


@pytest.mark.parametrize("hub", HUBS)
@pytest.mark.parametrize("route", ["models", "files"])
def test_hub_down_is_502_quickly(api, monkeypatch, hub, route):
    dead = start_huggingface() if hub == "huggingface" else start_modelscope()
    dead.stop()
    monkeypatch.setenv("HF_ENDPOINT" if hub == "huggingface" else "MODELSCOPE_ENDPOINT", dead.url)
    backoff = record_sleeps(monkeypatch)
    response = api.get(f"/api/v1/sources/{hub}/{route}", {"search": "x", "repo": "acme/x"})
    assert response.status_code == 502
    assert response.json()["hub"] == hub and "unreachable" in response.json()["detail"]
    assert backoff == []  # not the clients' back-off (up to ~23 s of sleeps)


def test_unknown_hub_is_404(api):
    assert api.get("/api/v1/sources/civitai/models").status_code == 404
    assert api.get("/api/v1/sources/civitai/files", {"repo": "a/b"}).json()["hub"] == "civitai"


def test_bad_query_is_400(api):
    assert api.get("/api/v1/sources/huggingface/files").status_code == 400
    assert api.get("/api/v1/sources/huggingface/files", {"repo": "../etc"}).status_code == 400
    assert api.get("/api/v1/sources/huggingface/models", {"limit": 0}).status_code == 400


def test_sources_need_an_admin(db):
    from rest_framework.test import APIClient

    assert APIClient().get("/api/v1/sources/huggingface/models").status_code == 401


def test_openapi_schema_has_the_source_routes(api):
    response = api.get("/api/schema/")
    assert response.status_code == 200
    assert b"/api/v1/sources/{hub}/models" in response.content and b"/api/v1/sources/{hub}/files" in response.content
