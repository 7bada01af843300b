"""What this machine has: CPU cores, RAM (psutil) and NVIDIA GPUs (nvidia-ml-py, when a driver is there)."""

from __future__ import annotations

import logging
import socket
from urllib.parse import urlsplit

import psutil

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
            gpus.append({
                "index": index,
                "name": name.decode() if isinstance(name, bytes) else name,
                "vendor": "nvidia",
                "uuid": uuid.decode() if isinstance(uuid, bytes) else uuid,
                "memory": {"total": int(memory.total), "used": int(memory.used)},
                "core": {"utilization": int(utilization)},
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


def system_status() -> dict:
    memory = psutil.virtual_memory()
    return {
        "cpu": {"total": psutil.cpu_count(logical=True) or 1},
        "memory": {"total": int(memory.total), "used": int(memory.total - memory.available)},
        "gpus": nvidia_gpus(),
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
