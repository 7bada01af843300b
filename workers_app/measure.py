"""What each backend really uses: the resident memory of its process tree (PSS, psutil) and, on NVIDIA GPUs, the VRAM
its processes hold (NVML's per-process accounting). Sampled by the worker before each heartbeat and sent with it; the
server keeps it beside the instance's claim and flags a backend that uses more than it claimed."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

import psutil

logger = logging.getLogger(__name__)


def tree_pids(pid: int) -> set[int]:
    """The process and all its descendants (a backend may run helpers, vLLM its engine core), while they live."""
    try:
        root = psutil.Process(pid)
        return {pid, *(child.pid for child in root.children(recursive=True))}
    except psutil.Error:
        return set()


def tree_memory(pids: set[int]) -> int:
    """The tree's resident memory: the sum of PSS (each shared page divided among the processes that map it, so
    libraries and the shared memory of vLLM's workers count once), RSS where PSS cannot be read."""
    total = 0
    for pid in pids:
        try:
            process = psutil.Process(pid)
            try:
                total += process.memory_full_info().pss
            except (psutil.AccessDenied, AttributeError):
                total += process.memory_info().rss
        except psutil.Error:
            continue  # ended between the listing and the reading
    return total


def gpu_memory_by_pid(nvml=None) -> dict[int, dict[int, int]]:
    """{GPU index: {pid: bytes}} for every process NVML accounts for (compute and graphics), or {} without an NVIDIA
    driver. `nvml`: the pynvml module (a fake in tests)."""
    if nvml is None:
        try:
            import pynvml as nvml
        except ImportError:
            return {}
    try:
        nvml.nvmlInit()
    except nvml.NVMLError:
        return {}
    try:
        found: dict[int, dict[int, int]] = {}
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            used = found[index] = {}
            for read in (nvml.nvmlDeviceGetComputeRunningProcesses, nvml.nvmlDeviceGetGraphicsRunningProcesses):
                try:
                    processes = read(handle)
                except nvml.NVMLError:
                    continue
                for process in processes:
                    size = getattr(process, "usedGpuMemory", None)
                    if isinstance(size, int) and size >= 0:  # None when the driver cannot tell (no accounting)
                        used[process.pid] = max(used.get(process.pid, 0), size)
        return found
    except nvml.NVMLError as exc:
        logger.warning("could not read the GPUs' per-process memory: %s", exc)
        return {}
    finally:
        try:
            nvml.nvmlShutdown()
        except nvml.NVMLError:
            pass


def measure(backends: dict[int, int], nvml=None) -> dict[str, dict]:
    """{instance id (as a string key): {"ram": bytes, "vram": {"<GPU index>": bytes}, "at": epoch seconds}} for the
    backends given as {instance id: process id}; a backend whose process is gone is left out."""
    if not backends:
        return {}
    return _measure(backends, gpu_memory_by_pid(nvml))


def sample(backends: dict[int, int], product_pids: Iterable[int], nvml=None) -> tuple[dict[str, dict], dict[int, int]]:
    """One reading for a heartbeat: what each backend uses (as `measure`), and per GPU index the bytes held by
    processes outside the product — neither one of `product_pids` (the worker, its backends and RPC servers) nor a
    descendant of one. The scheduler takes those off the GPU's free memory: a shared GPU is not over-committed."""
    gpus = gpu_memory_by_pid(nvml)
    ours = set()
    for pid in {*product_pids, *backends.values()}:
        ours |= tree_pids(pid)
    # A process this worker cannot see (NVML speaks of the host's process ids; a worker in a container sees its own)
    # cannot be told from ours: left out, as before this was measured, rather than taking our own backends twice.
    others = {index: sum(size for pid, size in used.items() if pid not in ours and psutil.pid_exists(pid))
              for index, used in gpus.items()}
    return (_measure(backends, gpus) if backends else {}), others


def _measure(backends: dict[int, int], gpus: dict[int, dict[int, int]]) -> dict[str, dict]:
    now = round(time.time(), 3)
    measured = {}
    for instance_id, pid in backends.items():
        pids = tree_pids(pid)
        if not pids:
            continue
        vram = {str(index): sum(size for p, size in used.items() if p in pids) for index, used in gpus.items()}
        measured[str(instance_id)] = {"ram": tree_memory(pids), "vram": {i: v for i, v in vram.items() if v},
                                      "at": now}
    return measured
