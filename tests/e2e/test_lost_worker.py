"""A worker that dies: its instances move to another worker; when it returns, its old backends are ended."""

import signal

import psutil

from tests.e2e.system import start_extra_worker, wait_until


def test_instances_of_a_killed_worker_move_to_another(system, tiny_models, tmp_path):
    second = start_extra_worker(system, "e2e-worker-b", tmp_path)
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
            second.send_signal(signal.SIGKILL)  # the worker dies; its backend lives on, unseen
            second.wait(10)
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
