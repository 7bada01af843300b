"""A worker that dies: its instances keep serving while their backends answer the server's health probe; once they
stop answering, they move to another worker; when the worker returns, its old backends are ended."""

import os
import signal
import time

import psutil

from tests.e2e.system import start_extra_worker, wait_until


def _end(pid: int | None) -> None:
    """A backend the test stopped, if the returning worker did not end it: nothing left behind."""
    try:
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def test_instances_of_a_killed_worker_serve_until_their_backends_stop_answering_then_move(system, tiny_models,
                                                                                            tmp_path):
    second = start_extra_worker(system, "e2e-worker-b", tmp_path)
    orphan_pid = None
    try:
        with system.client() as c:
            wait_until(lambda: any(w["name"] == "e2e-worker-b" and w["state"] == "ready"
                                   for w in c.get("/api/v1/workers").json()), 60, "the second worker to join")
            body = {"source": "local_path", "local_path": str(tiny_models["chat"]),
                    "backend_parameters": ["--ctx-size", "256"]}
            ballast = c.post("/api/v1/models", json={"name": "ballast", **body}).json()
            [anchor] = system.wait_for_instances(ballast["id"], "running")
            model = c.post("/api/v1/models", json={"name": "movable", **body}).json()
            [running] = system.wait_for_instances(model["id"], "running")
            # spread: the second model goes to the worker that holds less
            assert {anchor["worker_name"], running["worker_name"]} == {"e2e-worker", "e2e-worker-b"}
            if running["worker_name"] != "e2e-worker-b":  # the ballast landed on b: swap roles
                model, ballast, running = ballast, model, anchor
            orphan_pid = running["pid"]
            second.send_signal(signal.SIGKILL)  # the worker dies; its backend lives on, unseen by any agent
            second.wait(10)
            wait_until(lambda: {w["name"]: w["state"] for w in c.get("/api/v1/workers").json()}["e2e-worker-b"]
                       == "not_ready", 30, "the dead worker to be not ready")
            time.sleep(5)  # more rounds of the beat's check (every 2 s here): its backend answers, nothing moves
            [kept] = c.get(f"/api/v1/models/{model['id']}/instances").json()
            assert (kept["state"], kept["worker_name"]) == ("running", "e2e-worker-b")
            answer = c.post("/v1/chat/completions", json={"model": model["name"], "max_tokens": 4,
                                                          "messages": [{"role": "user", "content": "hi"}]})
            assert answer.status_code == 200, answer.text
            os.kill(orphan_pid, signal.SIGSTOP)  # now the backend stops answering too: the worker is lost
            moved = wait_until(lambda: [i for i in c.get(f"/api/v1/models/{model['id']}/instances").json()
                                        if i["state"] == "running" and i["worker_name"] == "e2e-worker"],
                               60, "the instance to run on the first worker")
            assert moved[0]["id"] == running["id"]  # the same instance, placed again
            workers = {w["name"]: w["state"] for w in c.get("/api/v1/workers").json()}
            assert workers["e2e-worker-b"] == "not_ready"
            assert psutil.pid_exists(orphan_pid)
            second = start_extra_worker(system, "e2e-worker-b", tmp_path)  # it comes back and cleans up
            wait_until(lambda: not psutil.pid_exists(orphan_pid)
                       or psutil.Process(orphan_pid).status() == psutil.STATUS_ZOMBIE, 30, "the old backend to end")
            c.delete(f"/api/v1/models/{model['id']}")
            c.delete(f"/api/v1/models/{ballast['id']}")
    finally:
        if second.poll() is None:
            second.send_signal(signal.SIGTERM)
            second.wait(30)
        _end(orphan_pid)
