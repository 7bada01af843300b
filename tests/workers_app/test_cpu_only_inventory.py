"""Without an NVIDIA driver the worker is CPU-only: no crash, no GPUs, real CPU and RAM numbers."""

import psutil

from workers_app.inventory import detect_ip, nvidia_gpus, system_status


def test_no_driver_means_no_gpus():
    try:
        import pynvml

        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
        has_driver = True
    except Exception:
        has_driver = False
    gpus = nvidia_gpus()
    if has_driver:
        assert all(g["memory"]["total"] > 0 and g["vendor"] == "nvidia" for g in gpus)
    else:
        assert gpus == []


def test_status_reports_cores_and_memory():
    status = system_status()
    assert status["cpu"]["total"] == psutil.cpu_count()
    assert status["memory"]["total"] == psutil.virtual_memory().total
    assert isinstance(status["gpus"], list)


def test_loopback_server_means_loopback_worker_ip():
    assert detect_ip("http://127.0.0.1:8000") == "127.0.0.1"
