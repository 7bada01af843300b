"""The worker's downloads into the shared cache, against the stand-in hubs with the real clients: progress while
the bytes arrive, one fetch when two instances want the same files, the cache used when the hub is gone, gated
repos with and without HF_TOKEN, and a clear error when the disk is too small."""

import hashlib
import shutil
import threading
from collections import namedtuple

import pytest

from models_app.choices import SourceChoices
from models_app.models import Model
from models_app.sources import SourceError
from tests.fixtures.hubs import point_clients_at, start_both, start_huggingface, start_modelscope, stop_all
from workers_app import downloads

REPO = "acme/Tiny-GGUF"
SIZE = 3 << 20
WEIGHTS = {"tiny-Q8_0.gguf": hashlib.shake_256(b"q8").digest(SIZE),
           "tiny-Q4_K_M-00001-of-00002.gguf": hashlib.shake_256(b"q4a").digest(SIZE // 2),
           "tiny-Q4_K_M-00002-of-00002.gguf": hashlib.shake_256(b"q4b").digest(SIZE // 2),
           "README.md": b"# tiny\n"}
HUBS = ("huggingface", "modelscope")


@pytest.fixture(scope="module")
def hubs():
    started = start_both({REPO: WEIGHTS})
    started["huggingface"].add_repo("acme/Gated-GGUF", {"g-Q8_0.gguf": b"GGUF" + bytes(1000)}, gated=True)
    started["huggingface"].tokens.add("hf_good")
    yield started
    stop_all(started)


@pytest.fixture
def env(hubs, monkeypatch, settings, tmp_path):
    settings.CACHE_DIR = tmp_path / "cache"
    return point_clients_at(hubs, monkeypatch)


def hub_model(hub: str, pattern: str, repo: str = REPO) -> Model:
    if hub == "huggingface":
        return Model(name="m", source=SourceChoices.HUGGINGFACE, huggingface_repo_id=repo,
                     huggingface_filename=pattern)
    return Model(name="m", source=SourceChoices.MODELSCOPE, model_scope_model_id=repo, model_scope_file_path=pattern)


@pytest.mark.parametrize("hub", HUBS)
def test_progress_is_reported_while_the_bytes_arrive(env, hub, monkeypatch):
    monkeypatch.setattr(downloads, "PROGRESS_EVERY_SECONDS", 0.2)
    env[hub].throttle_bytes_per_s = 2 << 20  # 3 MiB in about 1.5 s
    seen: list[float] = []
    path = downloads.download(hub_model(hub, "*Q8_0*.gguf"), seen.append)
    assert path.read_bytes() == WEIGHTS["tiny-Q8_0.gguf"]
    assert path.parent == downloads.repo_cache_dir(hub, REPO)
    between = [p for p in seen if 0 < p < 100]
    assert len(set(between)) >= 2, seen  # several distinct steps, not a jump from 0 to 100
    assert between == sorted(between) and seen[-1] == 100.0


@pytest.mark.parametrize("hub", HUBS)
def test_a_split_set_is_fetched_whole_and_loaded_from_its_first_part(env, hub):
    path = downloads.download(hub_model(hub, "*Q4_K_M*.gguf"), lambda p: None)
    folder = downloads.repo_cache_dir(hub, REPO)
    assert path == folder / "tiny-Q4_K_M-00001-of-00002.gguf"
    assert (folder / "tiny-Q4_K_M-00002-of-00002.gguf").read_bytes() == WEIGHTS["tiny-Q4_K_M-00002-of-00002.gguf"]
    assert not (folder / "tiny-Q8_0.gguf").exists()


@pytest.mark.parametrize("hub", HUBS)
def test_two_instances_wanting_the_same_file_fetch_it_once(env, hub):
    env[hub].throttle_bytes_per_s = 8 << 20
    served = env[hub].bytes_served
    results, errors = [], []

    def fetch():
        try:
            results.append(downloads.download(hub_model(hub, "tiny-Q8_0.gguf"), lambda p: None))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=fetch) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and len(results) == 2 and results[0] == results[1]
    assert results[0].read_bytes() == WEIGHTS["tiny-Q8_0.gguf"]
    assert env[hub].bytes_served - served == SIZE  # the second waited on the lock, then found the file


@pytest.mark.parametrize("hub", HUBS)
def test_files_already_here_are_used_when_the_hub_is_unreachable(env, hub, monkeypatch):
    first = downloads.download(hub_model(hub, "*Q8_0*.gguf"), lambda p: None)
    dead = start_huggingface() if hub == "huggingface" else start_modelscope()
    dead.stop()
    monkeypatch.setenv("HF_ENDPOINT" if hub == "huggingface" else "MODELSCOPE_ENDPOINT", dead.url)
    assert downloads.download(hub_model(hub, "*Q8_0*.gguf"), lambda p: None) == first
    with pytest.raises(SourceError) as never_fetched:  # nothing to fall back on: the hub's error
        downloads.download(hub_model(hub, "*Q4_K_M*.gguf"), lambda p: None)
    assert never_fetched.value.status == 502 and "unreachable" in never_fetched.value.message


@pytest.mark.parametrize("hub", HUBS)
def test_missing_repo_and_missing_file_say_so(env, hub):
    with pytest.raises(SourceError) as repo:
        downloads.download(hub_model(hub, "*.gguf", repo="acme/nothing"), lambda p: None)
    assert repo.value.status == 404
    with pytest.raises(SourceError) as file:
        downloads.download(hub_model(hub, "*Q2_K*.gguf"), lambda p: None)
    assert file.value.status == 404 and "*Q2_K*.gguf" in file.value.message


def test_gated_repo_needs_hf_token(env, monkeypatch):
    with pytest.raises(SourceError) as refused:
        downloads.download(hub_model("huggingface", "*.gguf", repo="acme/Gated-GGUF"), lambda p: None)
    assert refused.value.status == 403
    monkeypatch.setenv("HF_TOKEN", "hf_good")
    path = downloads.download(hub_model("huggingface", "*.gguf", repo="acme/Gated-GGUF"), lambda p: None)
    assert path.read_bytes() == b"GGUF" + bytes(1000)


@pytest.mark.parametrize("hub", HUBS)
def test_a_disk_too_small_is_refused_before_fetching(env, hub, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 << 30, 10 << 30, 1 << 20))
    served = env[hub].bytes_served
    with pytest.raises(SourceError) as full:
        downloads.download(hub_model(hub, "*Q8_0*.gguf"), lambda p: None)
    assert full.value.status == 507 and "not enough disk space" in full.value.message
    assert env[hub].bytes_served == served
