"""Reading and fetching hub files: an 8B GGUF header over Range requests, downloads through both hubs' clients,
and downloads cut off half-way that resume instead of starting over."""

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from models_app.sources import RangeFile, SourceError, get_source
from scheduler_app.estimators.gguf_reader import read_gguf_header
from tests.fixtures.hubs import (
    point_clients_at,
    record_sleeps,
    start_both,
    start_huggingface,
    start_modelscope,
    stop_all,
)
from tests.fixtures.sparse_gguf import LLAMA3_8B, write_sparse_llama
from tests.fixtures.tiny_gguf import write_tiny_llama

HUBS = ("huggingface", "modelscope")
REPO = "acme/Llama-3-8B-GGUF"
BIG = 24 << 20  # over huggingface_hub's 10 MiB write chunk, so a cut-off leaves bytes to resume from
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hub-files")
    return {
        "8b": write_sparse_llama(folder / "Meta-Llama-3-8B-Q4_K_M.gguf", **LLAMA3_8B),
        "tiny": write_tiny_llama(folder / "tiny-Q8_0.gguf"),
        "big": hashlib.shake_256(b"weights").digest(BIG),
    }


@pytest.fixture(scope="module")
def hubs(files):
    started = start_both({REPO: {"Meta-Llama-3-8B-Q4_K_M.gguf": files["8b"], "tiny-Q8_0.gguf": files["tiny"],
                                 "config.json": b'{"model_type": "llama"}', "weights/big-Q8_0.gguf": files["big"]}})
    yield started
    stop_all(started)


@pytest.fixture
def env(hubs, monkeypatch):
    return point_clients_at(hubs, monkeypatch)


@pytest.mark.parametrize("hub", HUBS)
def test_8b_gguf_header_over_range_requests(env, files, hub):
    source = get_source(hub)
    local = read_gguf_header(files["8b"])
    started = time.perf_counter()
    with RangeFile(source.file_url(REPO, "Meta-Llama-3-8B-Q4_K_M.gguf")) as remote:
        header = read_gguf_header(remote)
        fetched, size, requests = remote.bytes_fetched, remote.size, remote.requests
    elapsed = time.perf_counter() - started
    print(f"\n[{hub}] 8B GGUF header over HTTP: {fetched / 1e6:.2f} MB fetched of a {size / 1e9:.2f} GB file, "
          f"{requests} range requests, {elapsed * 1000:.0f} ms (header {header.data_offset / 1e6:.2f} MB)")
    assert size == files["8b"].stat().st_size
    assert header.metadata == local.metadata and header.tensors == local.tensors
    assert header.data_offset == local.data_offset
    assert fetched <= 10_000_000


def test_range_file_seeks_reads_and_caches(env, files):
    data = files["big"]
    with RangeFile(get_source("huggingface").file_url(REPO, "weights/big-Q8_0.gguf")) as remote:
        assert remote.size == BIG
        remote.seek(-100, os.SEEK_END)
        assert remote.read() == data[-100:]
        remote.seek(5 << 20)
        assert remote.read(3 << 20) == data[5 << 20:8 << 20]
        before = remote.bytes_fetched
        remote.seek(6 << 20)
        assert remote.read(1000) == data[6 << 20:(6 << 20) + 1000]
        assert remote.bytes_fetched == before  # served from the block cache
        assert remote.read(0) == b""


def test_range_file_reports_hub_errors(env, hubs):
    source = get_source("huggingface")
    hubs["huggingface"].add_repo("meta/gated", {"x-Q8_0.gguf": b"GGUF"}, gated=True)
    with pytest.raises(SourceError) as missing:
        RangeFile(source.file_url(REPO, "nope.gguf")).read(10)
    assert missing.value.status == 404
    with pytest.raises(SourceError) as gated:
        RangeFile(source.file_url("meta/gated", "x-Q8_0.gguf")).read(10)
    assert gated.value.status == 403 and "restricted" in gated.value.message


def test_range_file_sends_hf_token_to_the_hub_only(env, hubs, monkeypatch):
    hubs["huggingface"].add_repo("meta/gated2", {"x-Q8_0.gguf": b"GGUF-gated"}, gated=True)
    hubs["huggingface"].tokens.add("hf_secret")
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    with RangeFile(get_source("huggingface").file_url("meta/gated2", "x-Q8_0.gguf")) as remote:
        assert remote.read() == b"GGUF-gated"
    assert "Authorization" not in RangeFile(get_source("modelscope").file_url(REPO, "config.json")).headers


@pytest.mark.parametrize("hub", HUBS)
def test_download_through_the_hub_client(env, files, tmp_path, hub):
    paths = ["tiny-Q8_0.gguf", "config.json", "weights/big-Q8_0.gguf"]
    local = get_source(hub).download(REPO, paths, tmp_path)
    assert local == tmp_path / "tiny-Q8_0.gguf"
    assert local.read_bytes() == files["tiny"].read_bytes()
    assert (tmp_path / "config.json").read_bytes() == b'{"model_type": "llama"}'
    assert (tmp_path / "weights" / "big-Q8_0.gguf").read_bytes() == files["big"]
    served = env[hub].bytes_served
    get_source(hub).download(REPO, paths, tmp_path)  # already there: nothing is fetched again
    assert env[hub].bytes_served == served


@pytest.mark.parametrize("hub", HUBS)
def test_download_errors_are_source_errors(env, tmp_path, hub):
    with pytest.raises(SourceError) as missing_file:
        get_source(hub).download(REPO, ["nope.gguf"], tmp_path)
    assert missing_file.value.status == 404
    with pytest.raises(SourceError) as missing_repo:
        get_source(hub).download("acme/nothing", ["x.gguf"], tmp_path)
    assert missing_repo.value.status == 404


@pytest.mark.parametrize("hub", HUBS)
def test_download_from_a_hub_that_is_down_is_502(monkeypatch, tmp_path, hub):
    dead = start_huggingface() if hub == "huggingface" else start_modelscope()
    dead.stop()
    monkeypatch.setenv("HF_ENDPOINT" if hub == "huggingface" else "MODELSCOPE_ENDPOINT", dead.url)
    backoff = record_sleeps(monkeypatch)
    with pytest.raises(SourceError) as down:
        get_source(hub).download(REPO, ["config.json"], tmp_path)
    assert down.value.status == 502
    assert backoff == []  # refused at once, not after the clients' back-off


def _ranged_starts(hub, n0: int, name: str) -> list[int]:
    return [int(rng.split("=")[1].split("-")[0]) for method, path, rng in hub.requests[n0:]
            if method == "GET" and name in path and rng]


@pytest.mark.parametrize("hub", HUBS)
def test_download_cut_off_half_way_resumes(env, files, tmp_path, hub):
    fake, source = env[hub], get_source(hub)
    fake.fail_after_bytes = BIG // 2
    n0, served = len(fake.requests), fake.bytes_served
    try:
        source.download(REPO, ["weights/big-Q8_0.gguf"], tmp_path)  # the clients resume within the call
    except SourceError:
        source.download(REPO, ["weights/big-Q8_0.gguf"], tmp_path)  # or on the next one
    assert (tmp_path / "weights" / "big-Q8_0.gguf").read_bytes() == files["big"]
    starts = _ranged_starts(fake, n0, "big-Q8_0.gguf")
    assert starts and 0 < starts[0] <= BIG // 2  # resumed from what had arrived, not from zero
    assert fake.bytes_served - served < BIG + BIG // 2


_KILLED_DOWNLOAD = """
import sys
from pathlib import Path
from models_app.sources import get_source
get_source(sys.argv[1]).download(sys.argv[2], [sys.argv[3]], Path(sys.argv[4]))
"""


@pytest.mark.parametrize("hub", HUBS)
def test_killed_download_is_finished_by_the_next_call(env, files, tmp_path, hub):
    """A worker dies mid-download; the next call resumes from the bytes it left (ModelScope from its client's
    .incomplete file, Hugging Face from our partial file: huggingface_hub's own temp file dies with the call)."""
    fake = env[hub]
    fake.throttle_bytes_per_s = 8 << 20
    child = subprocess.Popen([sys.executable, "-c", _KILLED_DOWNLOAD, hub, REPO, "weights/big-Q8_0.gguf",
                              str(tmp_path)], cwd=ROOT, env=dict(os.environ), stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and child.poll() is None:
        partial = sum(p.stat().st_size for p in tmp_path.rglob("*.incomplete") if p.is_file())
        if partial >= 4 << 20:
            break
        time.sleep(0.05)
    child.kill()
    child.wait()
    assert not (tmp_path / "weights" / "big-Q8_0.gguf").exists()
    fake.throttle_bytes_per_s = None
    n0 = len(fake.requests)
    get_source(hub).download(REPO, ["weights/big-Q8_0.gguf"], tmp_path)
    assert (tmp_path / "weights" / "big-Q8_0.gguf").read_bytes() == files["big"]
    assert _ranged_starts(fake, n0, "big-Q8_0.gguf")[0] >= 4 << 20
