"""What this machine has: CPU cores, RAM (psutil) and NVIDIA GPUs (nvidia-ml-py, when a driver is there)."""

from __future__ import annotations

import logging
import platform
import socket
from urllib.parse import urlsplit

import psutil

from workers_app.backends.base import NodeInfo

logger = logging.getLogger(__name__)


def nvidia_gpus() -> list[dict]:
    """The NVIDIA GPUs, or [] on a machine without the driver (a CPU-only worker, no noise)."""
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return []
    try:
        gpus = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            try:
                utilization = pynvml.nvmlDeviceGetUtilizationRates(handle).gpu
            except pynvml.NVMLError:
                utilization = 0
            name = pynvml.nvmlDeviceGetName(handle)
            uuid = pynvml.nvmlDeviceGetUUID(handle)
            try:
                major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
                capability = f"{major}.{minor}"
            except pynvml.NVMLError:
                capability = ""
            gpus.append({
                "index": index,
                "name": name.decode() if isinstance(name, bytes) else name,
                "vendor": "nvidia",
                "uuid": uuid.decode() if isinstance(uuid, bytes) else uuid,
                "memory": {"total": int(memory.total), "used": int(memory.used)},
                "core": {"utilization": int(utilization)},
                "compute_capability": capability,
            })
        return gpus
    except pynvml.NVMLError as exc:
        logger.warning("NVIDIA driver present but unreadable, reporting no GPUs: %s", exc)
        return []
    finally:
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError:
            pass


def node_info(gpus: list[dict] | None = None) -> NodeInfo:
    from workers_app.backends.llama_box_install import cuda_compiler

    gpus = nvidia_gpus() if gpus is None else gpus
    return NodeInfo(gpus=tuple(gpus), machine=platform.machine(), system=platform.system(),
                    cuda_compiler=cuda_compiler() if gpus else "")


def backend_capabilities(node: NodeInfo) -> dict[str, dict]:
    """Per backend: the build this node needs, whether it can install it (and why not), the versions it has."""
    from workers_app.backends import all_backends

    return {backend.name: backend.capability(node) for backend in all_backends()}


def system_status(used_by_others: dict[int, int] | None = None) -> dict:
    """The inventory a worker reports. `used_by_others`: per GPU index, the bytes held by processes outside the
    product (workers_app.measure.sample), reported as each GPU's `memory.used_by_others`."""
    memory = psutil.virtual_memory()
    gpus = nvidia_gpus()
    for gpu in gpus:
        if used_by_others is not None and gpu["index"] in used_by_others:
            gpu["memory"]["used_by_others"] = int(used_by_others[gpu["index"]])
    return {
        # Utilization since the previous report (the first one reads 0): the Resources page shows it as a bar.
        "cpu": {"total": psutil.cpu_count(logical=True) or 1, "utilization": round(psutil.cpu_percent(interval=None))},
        "memory": {"total": int(memory.total), "used": int(memory.total - memory.available)},
        "gpus": gpus,
        "backends": backend_capabilities(node_info(gpus)),
    }


def detect_ip(server_url: str) -> str:
    """The local address that routes to the server (a UDP connect sends no packet)."""
    host = urlsplit(server_url).hostname or "127.0.0.1"
    if host in ("localhost", "127.0.0.1", "::1"):
        return "127.0.0.1"
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((host, 9))
            return s.getsockname()[0]
    except OSError:
        return "127.0.0.1"
