"""Deleting a model while its instances start, from two clients at once: no orphan, no stale row, no error logged."""

import threading

import psutil

from tests.e2e.system import wait_until


def test_double_delete_while_starting_leaves_nothing(system, tiny_models):
    with system.client() as c:
        model = c.post("/api/v1/models", json={"name": "racy", "source": "local_path", "replicas": 3,
                                               "local_path": str(tiny_models["chat"]),
                                               "backend_parameters": ["--ctx-size", "256"]}).json()
    log_before = system.log_path.read_text(errors="replace")

    def racy_backends():
        return {p.pid for p in psutil.process_iter(["name", "cmdline"])
                if p.info["name"] == "llama-server" and "racy" in " ".join(p.info["cmdline"] or [])}

    backends_before = wait_until(racy_backends, 20, "a backend of the model to start")
    statuses = []

    def delete():
        with system.client() as c:
            statuses.append(c.delete(f"/api/v1/models/{model['id']}").status_code)

    threads = [threading.Thread(target=delete) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(statuses) in ([204, 204], [204, 404])
    with system.client() as c:
        assert c.get(f"/api/v1/models/{model['id']}").status_code == 404
        assert not [i for i in c.get("/api/v1/instances").json() if i["model_name"] == "racy"]

    wait_until(lambda: not racy_backends(), 15, "every backend of the deleted model to end")
    assert backends_before  # some had started: the race was real
    new_log = system.log_path.read_text(errors="replace")[len(log_before):]
    assert "Traceback" not in new_log and " ERROR " not in new_log, new_log[-3000:]
