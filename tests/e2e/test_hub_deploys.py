"""Deploying from Hugging Face and ModelScope, end to end: search → files → deploy → the worker downloads with
progress → running → chat through the gateway; a missing repo and a missing file land on the instance with the
hub's reason; a download cut off half-way resumes from where it stopped. The hubs are local stand-ins spoken to by
the real huggingface_hub and modelscope clients inside the running system."""

import hashlib

import openai
import pytest

from tests.e2e.system import wait_until
from tests.fixtures.tiny_gguf import write_tiny_llama

HUBS = ("huggingface", "modelscope")
THROTTLE = 2 << 20  # bytes/s: a ~4 MB model takes about 2 s, so the download is seen in progress


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A GGUF model big enough (~4 MB) that the header read (1 MiB ranges) and the download are told apart."""
    return write_tiny_llama(tmp_path_factory.mktemp("hub-models") / "Tiny-Chat-Q8_0.gguf", n_embd=256, n_ff=1024,
                            seed=5, name="tiny-hub")


@pytest.fixture
def hub_repo(hubs, weights):
    """A repo of its own per test (the system's cache starts empty for it), on both hubs."""
    made = []

    def make(name: str) -> str:
        repo = f"acme/{name}-GGUF"
        for hub in hubs.values():
            hub.add_repo(repo, {"Tiny-Chat-Q8_0.gguf": weights, "README.md": b"# tiny\n"}, downloads=42, likes=7)
        made.append(repo)
        return repo

    yield make
    for hub in hubs.values():
        hub.throttle_bytes_per_s = hub.fail_after_bytes = None


def deploy(system, hub: str, name: str, repo: str, pattern: str) -> dict:
    fields = ({"huggingface_repo_id": repo, "huggingface_filename": pattern} if hub == "huggingface"
              else {"model_scope_model_id": repo, "model_scope_file_path": pattern})
    with system.client() as c:
        created = c.post("/api/v1/models", json={"name": name, "source": hub, "replicas": 1,
                                                 "backend_parameters": ["--ctx-size", "512"], **fields})
    assert created.status_code == 201, created.text
    return created.json()


def instances(system, model_id: int) -> list[dict]:
    with system.client() as c:
        return c.get(f"/api/v1/models/{model_id}/instances").json()


def resumed_from(fake, n0: int, name: str) -> list[int]:
    """Starts of open-ended Range GETs (`bytes=N-`): a download resuming; the header reads ask for closed ranges."""
    return [int(rng.split("=")[1].split("-")[0]) for method, path, rng in fake.requests[n0:]
            if method == "GET" and name in path and rng and rng.endswith("-")]


@pytest.mark.parametrize("hub", HUBS)
def test_search_files_deploy_download_and_chat(system, hubs, hub_repo, weights, hub):
    repo = hub_repo(f"Tiny-{hub}")
    fake = hubs[hub]
    with system.client() as c:
        found = c.get(f"/api/v1/sources/{hub}/models", params={"search": f"tiny-{hub}", "gguf": "true"})
        assert found.status_code == 200, found.text
        assert found.json()["hub"] == hub and "elapsed_ms" in found.json()
        assert [(r["id"], r["downloads"], r["likes"]) for r in found.json()["results"]] == [(repo, 42, 7)]
        files = c.get(f"/api/v1/sources/{hub}/files", params={"repo": repo})
        assert files.status_code == 200, files.text
        q8 = [g for g in files.json()["groups"]["gguf"] if g["quantization"] == "Q8_0"]
        assert q8 and q8[0]["size"] == weights.stat().st_size

    fake.throttle_bytes_per_s = THROTTLE
    model = deploy(system, hub, f"hub-chat-{hub}", repo, "*Q8_0*.gguf")
    seen: list[tuple[str, float]] = []

    def running():
        current = instances(system, model["id"])
        for i in current:
            seen.append((i["state"], i["download_progress"]))
            assert i["state"] != "error", i["state_message"]
        return [i for i in current if i["state"] == "running"]

    (instance,) = wait_until(running, 90, f"the {hub} model to download and run", interval=0.1)
    progress = sorted({p for state, p in seen if state == "downloading"})
    assert any(0 < p < 100 for p in progress), seen  # the download was seen part-way
    assert instance["download_progress"] == 100
    # Estimated from the headers before the download: a real claim, not the "unknown (0)" of an unreadable path.
    assert instance["computed_resource_claim"]["ram"] > 0
    fetched = (system.data_dir.parent / "cache" / "models" / hub / repo.replace("/", "--") / "Tiny-Chat-Q8_0.gguf")
    assert hashlib.sha256(fetched.read_bytes()).digest() == hashlib.sha256(weights.read_bytes()).digest()

    client = openai.OpenAI(base_url=f"{system.base_url}/v1", api_key=system.api_key, max_retries=0)
    reply = client.chat.completions.create(model=model["name"], messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=4)
    assert reply.choices[0].message.content
    with system.client() as c:
        assert c.delete(f"/api/v1/models/{model['id']}").status_code == 204


@pytest.mark.parametrize("hub", HUBS)
def test_download_cut_off_half_way_resumes(system, hubs, hub_repo, weights, hub):
    repo = hub_repo(f"Cut-{hub}")
    fake, size = hubs[hub], weights.stat().st_size
    fake.throttle_bytes_per_s = THROTTLE
    fake.fail_after_bytes = size // 2  # the download body (not the 1 MiB header ranges) is cut once
    n0 = len(fake.requests)
    model = deploy(system, hub, f"hub-cut-{hub}", repo, "Tiny-Chat-Q8_0.gguf")
    system.wait_for_instances(model["id"], "running", timeout=90)
    assert fake.fail_after_bytes is None  # the cut happened
    starts = resumed_from(fake, n0, "Tiny-Chat-Q8_0.gguf")
    assert starts and 0 < starts[0] <= size // 2, fake.requests[n0:]  # from the bytes that had arrived, not 0
    with system.client() as c:
        assert c.delete(f"/api/v1/models/{model['id']}").status_code == 204


@pytest.mark.parametrize("hub", HUBS)
def test_missing_repo_and_missing_file_land_on_the_instance(system, hub_repo, hub):
    repo = hub_repo(f"Present-{hub}")
    no_repo = deploy(system, hub, f"no-repo-{hub}", "acme/does-not-exist", "*.gguf")
    no_file = deploy(system, hub, f"no-file-{hub}", repo, "*Q2_K*.gguf")
    (gone,) = system.wait_for_instances(no_repo["id"], "error", timeout=60)
    assert "does-not-exist" in gone["state_message"] and "not" in gone["state_message"].lower(), gone
    (missing,) = system.wait_for_instances(no_file["id"], "error", timeout=60)
    assert "*Q2_K*.gguf" in missing["state_message"], missing
    assert missing["worker"] is None  # known before placing it: nothing was booked or launched
    with system.client() as c:
        for model in (no_repo, no_file):
            assert c.delete(f"/api/v1/models/{model['id']}").status_code == 204
