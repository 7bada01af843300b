"""The interface every inference backend implements, and the registry that finds them.

A backend module (`llama_box.py`, `vllm.py`, `vox_box.py`) says everything about its backend: how a version is
installed or found on a node, its command line, environment, health check, how its log names a failure, its
reserved flags and parameter checks, which model formats and categories it serves, and which selectors the
scheduler runs for it. Nothing here imports Django models, so the API, the scheduler and the node agent can all
read the registry.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from workers_app.backends.params import flag_names

ERROR_WORDS = ("error", "failed", "invalid", "abort", "exception", "traceback", "cannot", "unable", "not found",
               "out of memory")
# What a backend process must not be told by a model's `env`: the placement decides these.
PLACEMENT_ENV = frozenset({"CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES",
                           "ROCR_VISIBLE_DEVICES", "GPU_DEVICE_ORDINAL", "CUDA_DEVICE_ORDER"})
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Variables that make the loader or Python run code of the model's choosing inside the backend (as the worker's
# user): refused in a model's env unless the operator allows them (AIMIND_ALLOW_LOADER_ENV).
LOADER_ENV = re.compile(r"^(LD_\w+|DYLD_\w+|PYTHON(PATH|HOME|STARTUP|USERBASE|EXECUTABLE|INSPECT|BREAKPOINT)|"
                        r"BASH_ENV|ENV|PERL5OPT|PERL5LIB|NODE_OPTIONS|RUBYOPT)$")
# What a backend process inherits from the worker's own environment; everything else (REDIS_URL, DATABASE_URL,
# AIMIND_*, the cluster token …) stays with the worker.
INHERITED_ENV = re.compile(r"^(PATH|HOME|USER|LOGNAME|LANG|LANGUAGE|LC_\w+|TZ|TERM|SHELL|TMPDIR|LD_LIBRARY_PATH|"
                           r"CUDA_HOME|CUDA_PATH|NVIDIA_DRIVER_CAPABILITIES|HF_HOME|HF_HUB_CACHE|HF_ENDPOINT|"
                           r"MODELSCOPE_CACHE|OMP_NUM_THREADS|SSL_CERT_FILE|REQUESTS_CA_BUNDLE|HTTPS?_PROXY|NO_PROXY|"
                           r"https?_proxy|no_proxy)$")
# A version as package indexes spell them (0.3.36, 0.12.0.post2, 1.0rc1, v1.0.0): it names a directory, too.
VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9.+_-]{0,63}")
# How command-line parsers refuse their arguments (llama.cpp's `error: invalid argument: --x`, argparse's
# `prog: error: unrecognized arguments: --x`): retrying the same arguments cannot help.
ARGUMENT_REJECTION = re.compile(r"^(?:[\w./-]+: )?(?:error: (?:unrecognized arguments|argument |invalid argument"
                                r"|the following arguments are required)|error while handling argument)")

Progress = Callable[[str], None]


class BackendError(Exception):
    """A launch failed. `permanent` means retrying cannot help (bad arguments, missing file, unknown version)."""

    def __init__(self, message: str, *, permanent: bool = False):
        super().__init__(message)
        self.permanent = permanent


@dataclass(frozen=True)
class NodeInfo:
    """What a node offers a backend: its NVIDIA GPUs (with compute capability), CPU architecture, CUDA compiler."""

    gpus: tuple[dict, ...] = ()
    machine: str = "x86_64"
    system: str = "Linux"
    cuda_compiler: str = ""  # nvcc's path, the wheels that would bring one, or "" (no NVIDIA GPU)

    @property
    def has_nvidia_gpus(self) -> bool:
        return any(g.get("vendor", "nvidia") == "nvidia" for g in self.gpus)


@dataclass(frozen=True)
class Installation:
    """One installed version of a backend on this node: what `command` runs."""

    backend: str
    version: str
    variant: str
    root: Path
    entry: Path  # the program `command` starts


def distributed_master_port(instance_id: int, attempt: int) -> int:
    """The port a distributed instance's main gathers its nodes on (vLLM's --master-port): known to every worker of
    the instance without asking, and another for each attempt (an old one may linger in TIME_WAIT)."""
    return 29500 + (instance_id * 31 + attempt) % 1000


@dataclass
class PartSpec:
    """One part of a distributed instance, on a subordinate worker: what its command needs."""

    installation: Installation
    host: str  # this worker's address
    port: int  # a free port here, for a part that listens
    threads: int
    index: int = 0  # its place in the instance's `distributed_servers`
    gpu_indexes: list[int] = field(default_factory=list)
    claim: dict = field(default_factory=dict)
    model_name: str = ""
    model_path: Path | None = None
    backend_parameters: list[str] = field(default_factory=list)
    main_host: str = ""
    master_port: int = 0
    env: dict[str, str] = field(default_factory=dict)  # the model's
    tmp_dir: Path | None = None


@dataclass
class LaunchSpec:
    model_name: str
    model_path: Path
    host: str
    port: int
    categories: list[str]
    gpu_indexes: list[int]
    claim: dict
    backend_parameters: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    installation: Installation | None = None
    rpc_servers: list[str] = field(default_factory=list)  # host:port of its parts on other workers, in order
    master_port: int = 0  # distributed vLLM: where node rank 0 (this main) gathers its headless nodes
    api_key: str = ""  # the instance's own secret: the backend answers only requests that carry it (the gateway's)
    work_dir: Path | None = None  # a directory of the instance's own (vox-box's --data-dir)
    tmp_dir: Path | None = None  # the instance's TMPDIR: short, as vLLM's IPC socket paths must be


class Backend:
    name: str = ""
    label: str = ""
    default_version: str = ""
    # The model formats this backend serves ("gguf", "hf" = a Hugging Face-format directory or repo,
    # "faster-whisper" = a CTranslate2 Whisper directory) and the categories it is the natural choice for.
    formats: frozenset[str] = frozenset()
    categories: frozenset[str] = frozenset()
    # Dotted path of the scheduler's selector list for this backend, tried in order.
    selectors: str = ""
    health_path: str = "/health"
    # Flags aiMindServe sets itself; a user passing them would break routing.
    reserved_flags: frozenset[str] = frozenset()
    reserved_env: frozenset[str] = PLACEMENT_ENV
    # The variable from which the backend takes the key it requires of every inference request ("" when it has no
    # such option: then anyone who reaches the worker's port reaches the backend).
    api_key_env: str = ""

    # Node side: variants, installs, launches.

    def variant(self, node: NodeInfo) -> str:
        """The build this node needs (e.g. "cpu", "cuda", "cuda-sm90")."""
        return "cpu"

    def installable(self, node: NodeInfo) -> tuple[bool, str]:
        """Whether this node can install the backend, and if not, why (shown when the scheduler skips it)."""
        return True, ""

    def installed_versions(self, variant: str) -> list[str]:
        return []

    def index_packages(self) -> list[str]:
        """The packages on the package index whose versions are this backend's versions."""
        return []

    def find(self, version: str, variant: str) -> Installation | None:
        raise NotImplementedError

    def install(self, version: str, variant: str, progress: Progress = print) -> Installation:
        raise NotImplementedError

    def capability(self, node: NodeInfo) -> dict:
        """What the worker reports at registration for this backend."""
        variant = self.variant(node)
        ok, reason = self.installable(node)
        return {"variant": variant, "installable": ok, "reason": reason, "default_version": self.default_version,
                "installed": self.installed_versions(variant)}

    def resolve_model_path(self, path: Path) -> Path:
        if not path.exists():
            raise BackendError(f"local_path {path} does not exist on this worker", permanent=True)
        return path

    def command(self, spec: LaunchSpec) -> list[str]:
        raise NotImplementedError

    def environment(self, spec: LaunchSpec) -> dict[str, str]:
        """The model's env, then what the placement sets (which the model's env cannot override). Temporary files
        (vLLM's IPC sockets and compile cache, vox-box's generated audio) go to the instance's own directory,
        which is removed with the instance."""
        visible = ",".join(str(i) for i in spec.gpu_indexes)
        env = {k: str(v) for k, v in spec.env.items() if k not in self.reserved_env}
        if spec.tmp_dir is not None and "TMPDIR" not in env:
            spec.tmp_dir.mkdir(parents=True, exist_ok=True)
            env["TMPDIR"] = str(spec.tmp_dir)
        if spec.api_key and self.api_key_env:  # by the environment: the command line is visible to every user
            env[self.api_key_env] = spec.api_key
        return {**env, "CUDA_VISIBLE_DEVICES": visible}

    # A part that listens (llama.cpp's RPC server) is ready when it accepts connections; one that does not (a
    # headless vLLM node, which dials its main) once it has stayed up a few seconds. A part that loads the model
    # itself needs the model's files on its worker.
    part_listens = True
    part_needs_model = False
    part_label = "RPC server"

    def part_command(self, part: PartSpec) -> list[str]:
        """The process a subordinate worker runs as its part of a distributed instance."""
        raise BackendError(f"{self.name} cannot run parts of an instance on other workers", permanent=True)

    def part_environment(self, part: PartSpec) -> dict[str, str]:
        """The model's env, a TMPDIR of the part's own, and only its own GPUs (none: the CPU)."""
        env = {k: str(v) for k, v in part.env.items() if k not in self.reserved_env}
        if part.tmp_dir is not None and "TMPDIR" not in env:
            part.tmp_dir.mkdir(parents=True, exist_ok=True)
            env["TMPDIR"] = str(part.tmp_dir)
        return {**env, "CUDA_VISIBLE_DEVICES": ",".join(str(i) for i in part.gpu_indexes)}

    def error_from_log(self, lines: list[str]) -> str:
        """The last line of a failed run's log that reads like a cause; empty when none does (a kill -9
        leaves only ordinary lines, and quoting one of them would mislead)."""
        for line in reversed([line.strip() for line in lines if line.strip()]):
            lowered = line.lower()
            if any(word in lowered for word in ERROR_WORDS):
                return line
        return ""

    def exit_is_permanent(self, returncode: int, lines: list[str], was_healthy: bool) -> bool:
        """An exit that restarting cannot fix: the backend refused its arguments before it ever served."""
        if was_healthy:
            return False
        return any(ARGUMENT_REJECTION.match(line.strip()) for line in lines)

    # API and scheduler side: parameters.

    def parse_parameters(self, params: list[str]) -> dict:
        """The flags that change the resource estimate, as a dict; ValueError naming the flag when one is bad."""
        return {}

    def check_parameters(self, params: list) -> list[str]:
        """Problems with a parameter list, as messages; empty when it is fine."""
        problems = [f"{item!r} is not a non-empty string" for item in params if not isinstance(item, str) or not item]
        if problems:
            return problems
        problems += [f"{name} is set by aiMindServe and cannot be overridden"
                     for name in sorted(flag_names(params) & self.reserved_flags)]
        if params and not params[0].startswith("-"):
            problems.append(f"{params[0]!r} must follow the flag whose value it is (e.g. --ctx-size 4096)")
        if not problems:
            try:
                self.parse_parameters(params)
            except ValueError as exc:
                problems.append(str(exc))
        return problems

    def check_env(self, env: dict, allow_loader_env: bool = False) -> list[str]:
        problems = []
        for name, value in env.items():
            if not ENV_NAME.fullmatch(str(name)):
                problems.append(f"{name!r} is not a valid environment variable name")
            elif name in self.reserved_env:
                problems.append(f"{name} is set by aiMindServe from the placement and cannot be overridden")
            elif LOADER_ENV.match(name) and not allow_loader_env:
                problems.append(f"{name} would run code inside the backend; an operator may allow such variables "
                                f"with AIMIND_ALLOW_LOADER_ENV=true")
            elif "\x00" in str(value):
                problems.append(f"{name} contains a NUL byte")
        return problems


_REGISTRY: dict[str, Backend] = {}


def version_problem(version: str) -> str | None:
    if version and not VERSION.fullmatch(version):
        return f"{version!r} is not a version (letters, digits and . + _ - only, at most 64)"
    return None


def register(backend: Backend) -> Backend:
    _REGISTRY[backend.name] = backend
    return backend


def registered() -> dict[str, Backend]:
    return _REGISTRY
