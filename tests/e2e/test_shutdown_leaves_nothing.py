"""SIGTERM to `up` ends every process it started, llama-server backends included; its console says where it runs
and who joined, then only warnings and errors, while every process's whole log goes to files."""

import psutil

from tests.e2e.system import start_system, wait_until


def test_sigterm_leaves_no_process_behind(tmp_path, tiny_models):
    system = start_system(tmp_path, worker_name="shutdown-worker", extra_env={"AIMIND_LOG_LEVEL": "WARNING"})
    try:
        with system.client() as c:
            model = c.post("/api/v1/models", json={"name": "tiny", "source": "local_path",
                                                   "local_path": str(tiny_models["chat"]),
                                                   "backend_parameters": ["--ctx-size", "256"]}).json()
        running = system.wait_for_instances(model["id"], "running")
        backend_pid = running[0]["pid"]
        assert psutil.pid_exists(backend_pid)
        names = {psutil.Process(pid).name() for pid in system.descendants()}
        assert "llama-server" in names and "redis-server" in names
    finally:
        code = system.stop()
    assert code == 0, system.log_tail()
    wait_until(lambda: not system.leftovers(), 10, "every child process to exit")
    assert not psutil.pid_exists(backend_pid) or psutil.Process(backend_pid).status() == psutil.STATUS_ZOMBIE
    console = (tmp_path / "up.log").read_text()
    assert f"aiMindServe is running at http://127.0.0.1:{system.port}/" in console
    assert "sign in as user admin" in console and "worker shutdown-worker joined: " in console
    assert " INFO " not in console and "INFO:" not in console, console[-3000:]
    logs = system.data_dir / "logs"
    for name in ("up", "web", "scheduler", "beat", "worker"):
        assert " INFO " in (logs / f"{name}.log").read_text() or "INFO:" in (logs / f"{name}.log").read_text(), name
