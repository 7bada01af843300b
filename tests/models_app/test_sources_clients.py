"""The stand-in hubs speak what the real clients need: huggingface_hub and modelscope, called directly, end to end."""

import pytest

from tests.fixtures.hubs import start_huggingface, start_modelscope

FILES = {"Model-Q4_K_M.gguf": b"GGUF" + bytes(3000), "Model-Q8_0.gguf": b"GGUF" + bytes(5000),
         "sub/config.json": b'{"a": 1}', "README.md": b"# readme\n"}
REPO = "acme/Model-GGUF"


@pytest.fixture(scope="module")
def hf():
    hub = start_huggingface()
    hub.add_repo(REPO, FILES, downloads=7, likes=3)
    hub.add_repo("acme/plain", {"config.json": b"{}"}, downloads=1)
    hub.add_repo("acme/gated-GGUF", {"g-Q8_0.gguf": b"GGUF"}, gated=True)
    yield hub
    hub.stop()


@pytest.fixture(scope="module")
def ms():
    hub = start_modelscope()
    hub.add_repo(REPO, FILES, downloads=7, likes=3)
    hub.add_repo("acme/plain", {"config.json": b"{}"}, downloads=1)
    yield hub
    hub.stop()


def test_huggingface_listing_calls(hf):
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoFile, RepoFolder

    api = HfApi(endpoint=hf.url)
    assert [m.id for m in api.list_models(search="acme/")] == [REPO, "acme/plain", "acme/gated-GGUF"]
    assert [(m.id, m.downloads, m.likes) for m in api.list_models(search="model", filter="gguf")] == [(REPO, 7, 3)]
    info = api.model_info(REPO, files_metadata=True)
    assert {s.rfilename: s.size for s in info.siblings} == {p: len(d) for p, d in FILES.items()}
    assert info.siblings[0].lfs is not None and len(info.sha) == 40
    tree = list(api.list_repo_tree(REPO, recursive=True))
    assert {e.path for e in tree if isinstance(e, RepoFile)} == set(FILES)
    assert [e.path for e in tree if isinstance(e, RepoFolder)] == ["sub"]
    assert [e.path for e in api.list_repo_tree(REPO, path_in_repo="sub")] == ["sub/config.json"]
    assert api.model_info(REPO, revision=info.sha).sha == info.sha


def test_huggingface_downloads(hf, tmp_path):
    from huggingface_hub import hf_hub_download, snapshot_download

    cached = hf_hub_download(REPO, "Model-Q8_0.gguf", endpoint=hf.url, cache_dir=tmp_path / "cache")
    assert open(cached, "rb").read() == FILES["Model-Q8_0.gguf"]
    local = hf_hub_download(REPO, "sub/config.json", endpoint=hf.url, local_dir=tmp_path / "local")
    assert open(local, "rb").read() == FILES["sub/config.json"]
    snap = snapshot_download(REPO, endpoint=hf.url, local_dir=tmp_path / "snap", allow_patterns=["*Q4_K_M*"],
                             cache_dir=tmp_path / "cache")  # it records refs there even with local_dir
    got = sorted(p.name for p in (tmp_path / "snap").iterdir() if p.is_file())
    assert snap == str(tmp_path / "snap") and got == ["Model-Q4_K_M.gguf"]


def test_huggingface_errors(hf, tmp_path):
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import GatedRepoError, RemoteEntryNotFoundError, RepositoryNotFoundError

    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=hf.url).model_info("acme/missing")
    with pytest.raises(GatedRepoError):
        hf_hub_download("acme/gated-GGUF", "g-Q8_0.gguf", endpoint=hf.url, cache_dir=tmp_path)
    with pytest.raises(RemoteEntryNotFoundError):
        hf_hub_download(REPO, "missing.json", endpoint=hf.url, cache_dir=tmp_path)


def test_modelscope_listing_calls(ms):
    from modelscope.hub.api import HubApi

    api = HubApi(endpoint=ms.url)
    page = api.list_repos("model", search="acme")
    assert [(r.repo_id, r.downloads, r.likes) for r in page.items] == [(REPO, 7, 3), ("acme/plain", 1, 0)]
    assert [r.repo_id for r in api.list_repos("model", search="acme", library="gguf").items] == [REPO]
    files = {f["Path"]: f["Size"] for f in api.get_model_files(REPO, revision="master")}
    assert files == {**{p: len(d) for p, d in FILES.items()}, "sub": 0}
    assert api.get_model(REPO)["Downloads"] == 7  # legacy PascalCase keys
    assert api.get_valid_revision(REPO) == "master"


def test_modelscope_downloads(ms, tmp_path):
    from modelscope.hub.file_download import model_file_download
    from modelscope.hub.snapshot_download import snapshot_download

    path = model_file_download(REPO, "Model-Q8_0.gguf", revision="master", endpoint=ms.url,
                               cache_dir=str(tmp_path / "cache"))
    assert open(path, "rb").read() == FILES["Model-Q8_0.gguf"]
    path = model_file_download(REPO, "sub/config.json", revision="master", endpoint=ms.url,
                               local_dir=str(tmp_path / "local"), cache_dir=str(tmp_path / "cache"))  # its locks
    assert open(path, "rb").read() == FILES["sub/config.json"]
    snap = snapshot_download(REPO, endpoint=ms.url, local_dir=str(tmp_path / "snap"), allow_patterns=["*Q4_K_M*"],
                             cache_dir=str(tmp_path / "cache"))
    got = sorted(p.name for p in (tmp_path / "snap").iterdir() if p.is_file())
    assert snap == str(tmp_path / "snap") and got == ["Model-Q4_K_M.gguf"]


def test_range_requests_are_honoured(hf, ms):
    import httpx

    for url in (f"{hf.url}/{REPO}/resolve/main/README.md",
                f"{ms.url}/api/v1/models/{REPO}/repo?Revision=master&FilePath=README.md"):
        response = httpx.get(url, headers={"Range": "bytes=2-5"}, follow_redirects=True)
        assert response.status_code == 206 and response.content == FILES["README.md"][2:6]
        assert response.headers["Content-Range"] == f"bytes 2-5/{len(FILES['README.md'])}"
        assert httpx.get(url, headers={"Range": "bytes=999-"}).status_code == 416
