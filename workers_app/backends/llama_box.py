"""llama.cpp's llama-server ("llama-box" in the product's words) for GGUF models."""

from __future__ import annotations

import re
import shutil
import subprocess
from functools import lru_cache
from pathlib import Path

from workers_app.backends import installs, llama_box_install
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
from workers_app.backends.params import as_separate_arguments, flag_names

ALL_LAYERS = 999  # -ngl beyond the layer count offloads every layer
_FLAG_ALIASES = {"-c": "ctx_size", "--ctx-size": "ctx_size", "-ngl": "n_gpu_layers", "--n-gpu-layers": "n_gpu_layers",
                 "--gpu-layers": "n_gpu_layers", "-ts": "tensor_split", "--tensor-split": "tensor_split",
                 "-ctk": "cache_type_k", "--cache-type-k": "cache_type_k", "-ctv": "cache_type_v",
                 "--cache-type-v": "cache_type_v", "-np": "parallel", "--parallel": "parallel",
                 "--cache-ram": "cache_ram_mib", "-cram": "cache_ram_mib"}
_INT_KEYS = {"ctx_size", "n_gpu_layers", "parallel", "cache_ram_mib"}
# llama.cpp's own floors: 0 context = the model's; -1 layers, slots and cache = automatic / unlimited.
_LOWEST = {"ctx_size": 0, "n_gpu_layers": -1, "parallel": -1, "cache_ram_mib": -1}
_HELP_FLAG = re.compile(r"(?<![\w-])(--?[a-zA-Z][\w-]*)")


class BackendParameterError(ValueError):
    pass


def parse_backend_parameters(params: list[str]) -> dict:
    """The estimate-relevant llama-server flags, from `--p=v`, `--p v` (two items) or `-c 4096`."""
    found: dict = {}
    i = 0
    while i < len(params):
        flag, eq, value = params[i].partition("=")
        key = _FLAG_ALIASES.get(flag)
        if key is None:
            i += 1
            continue
        if not eq:
            if i + 1 >= len(params):
                raise BackendParameterError(f"{flag} needs a value")
            value = params[i + 1]
            i += 1
        i += 1
        try:
            if key in _INT_KEYS:
                found[key] = int(value)
            elif key == "tensor_split":
                found[key] = [float(x) for x in re.split(r"[,/]", value) if x]
            else:
                found[key] = value.lower()
        except ValueError:
            raise BackendParameterError(f"{flag} expects {'an integer' if key in _INT_KEYS else 'numbers'}, "
                                        f"got {value!r}") from None
        low = _LOWEST.get(key)
        if low is not None and found[key] < low:
            raise BackendParameterError(f"{flag} must be at least {low}, got {found[key]}")
        if key == "tensor_split" and any(x < 0 or x != x for x in found[key]):
            raise BackendParameterError(f"{flag} takes shares of 0 or more, got {value!r}")
    return found


@lru_cache(maxsize=16)
def _known_flags(server: str, mtime_ns: int) -> frozenset[str]:
    """The flags this build of llama-server accepts (older versions lack newer ones, e.g. --cache-ram)."""
    try:
        out = subprocess.run([server, "--help"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return frozenset()
    return frozenset(_HELP_FLAG.findall(out.stdout + out.stderr))


def known_flags(server: Path) -> frozenset[str]:
    try:
        return _known_flags(str(server), server.stat().st_mtime_ns)
    except OSError:
        return frozenset()


class LlamaBox(Backend):
    name = "llama-box"
    label = "llama-box (llama.cpp)"
    default_version = llama_box_install.LLAMA_CPP_PYTHON_VERSION
    formats = frozenset({"gguf"})
    categories = frozenset({"llm", "embedding", "reranker"})
    selectors = "scheduler_app.selectors.llama_box.SELECTORS"
    reserved_flags = frozenset({"--host", "--port", "-m", "--model", "--alias", "-a", "--api-key", "--api-key-file"})
    reserved_env = PLACEMENT_ENV | {"LLAMA_API_KEY"}
    api_key_env = "LLAMA_API_KEY"

    def variant(self, node: NodeInfo) -> str:
        return llama_box_install.variant_for(node.gpus, node.cuda_compiler)

    def installable(self, node: NodeInfo) -> tuple[bool, str]:
        missing = [tool for tool in ("cmake", "c++") if shutil.which(tool) is None]
        if missing:
            return False, f"cannot build llama.cpp here: {' and '.join(missing)} not found"
        return True, ""

    def installed_versions(self, variant: str) -> list[str]:
        built = installs.installed_versions(self.name, variant)
        if shutil.which("llama-box") and self.default_version not in built:
            built.append(self.default_version)  # the binary on PATH serves the default version
        return built

    def index_packages(self) -> list[str]:
        return ["llama-cpp-python"]

    def find(self, version: str, variant: str) -> Installation | None:
        found = llama_box_install.find(version if version != self.default_version else "", variant)
        if found is None:
            return None
        return Installation(self.name, found.version, variant, found.server.parent, found.server)

    def install(self, version: str, variant: str, progress: Progress = print) -> Installation:
        built = llama_box_install.build(version or self.default_version, variant, progress=progress)
        return Installation(self.name, built.version, variant, built.server.parent, built.server)

    def resolve_model_path(self, path: Path) -> Path:
        from models_app.sources.local import gguf_files_under

        if not path.exists():
            raise BackendError(f"local_path {path} does not exist on this worker", permanent=True)
        files = gguf_files_under(path)
        if not files:
            raise BackendError(f"no .gguf file found at {path}", permanent=True)
        return files[0]  # llama.cpp finds the other split parts itself

    def parse_parameters(self, params: list[str]) -> dict:
        return parse_backend_parameters(params)

    def part_command(self, part: PartSpec) -> list[str]:
        root = part.installation.root
        rpc = next((root / name for name in llama_box_install.RPC_TARGETS if (root / name).is_file()), None)
        rpc = rpc or shutil.which("ggml-rpc-server") or shutil.which("rpc-server")  # beside a llama-box on PATH
        if rpc is None:
            raise BackendError(f"this llama.cpp build ({root}) has no RPC server", permanent=True)
        return [str(rpc), "-H", part.host, "-p", str(part.port), "-t", str(max(1, part.threads))]

    def command(self, spec: LaunchSpec) -> list[str]:
        if spec.installation is None:
            raise BackendError("llama-server is not installed on this worker (run `make setup`)")
        server = spec.installation.entry
        user = as_separate_arguments(list(spec.backend_parameters))
        given = flag_names(user)
        claim = spec.claim
        unknown = bool(claim.get("unknown"))
        cmd = [str(server), "--host", spec.host, "--port", str(spec.port), "-m", str(spec.model_path),
               "--alias", spec.model_name]
        if spec.rpc_servers:  # distributed: its parts' RPC servers come first in llama.cpp's device list
            cmd += ["--rpc", ",".join(spec.rpc_servers)]
        devices = len(spec.rpc_servers) + len(spec.gpu_indexes)
        if not given & {"-ngl", "--n-gpu-layers", "--gpu-layers"}:
            if not devices:
                layers = 0
            else:  # an unknown claim offloads everything, as llama.cpp would on the GPUs it was given
                layers = ALL_LAYERS if unknown else claim.get("offload_layers", 0)
            cmd += ["-ngl", str(layers)]
        if devices > 1 and claim.get("tensor_split") and not given & {"-ts", "--tensor-split"}:
            cmd += ["--tensor-split", ",".join(f"{x:g}" for x in claim["tensor_split"])]
        if not given & {"-c", "--ctx-size"} and claim.get("ctx_size"):
            cmd += ["--ctx-size", str(claim["ctx_size"])]
        if not given & {"--cache-ram", "-cram"} and "--cache-ram" in known_flags(server):
            cmd += ["--cache-ram", "0"]  # the prompt cache grows to 8 GiB by default: only when asked, and estimated
        if "embedding" in spec.categories and not given & {"--embedding", "--embeddings"}:
            cmd.append("--embeddings")
        if "reranker" in spec.categories and "--rerank" not in given:
            cmd.append("--rerank")
        return cmd + user


register(LlamaBox())
