"""Model lifecycle on real processes: scale, delete and replace, stop/start, crash and restart with backoff,
bad parameters, outdated instances after an edit."""

import os
import signal
import time
from datetime import datetime

import psutil

from tests.e2e.system import wait_until


def instances(system, model_id):
    with system.client() as c:
        return c.get(f"/api/v1/models/{model_id}/instances").json()


def alive(pid) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def when(timestamp: str) -> datetime:
    return datetime.fromisoformat(timestamp.replace("Z", "+00:00"))


def test_scale_up_and_down_keeps_the_oldest_running_replica(system, deploy):
    model = deploy("scaled")
    [first] = system.wait_for_instances(model["id"], "running")
    with system.client() as c:
        assert c.patch(f"/api/v1/models/{model['id']}", json={"replicas": 3}).status_code == 200
        system.wait_for_instances(model["id"], "running", count=3)
        extra_pids = [i["pid"] for i in instances(system, model["id"]) if i["id"] != first["id"]]
        assert c.patch(f"/api/v1/models/{model['id']}", json={"replicas": 1}).status_code == 200
    wait_until(lambda: len(instances(system, model["id"])) == 1, 10, "scale down to 1")
    assert [i["id"] for i in instances(system, model["id"])] == [first["id"]]
    wait_until(lambda: not any(alive(p) for p in extra_pids), 10, "the removed replicas' processes to end")


def test_deleted_instance_is_replaced_with_a_new_id(system, deploy):
    model = deploy("replaced")
    [old] = system.wait_for_instances(model["id"], "running")
    with system.client() as c:
        assert c.delete(f"/api/v1/instances/{old['id']}").status_code == 204
        assert c.delete(f"/api/v1/instances/{old['id']}").status_code == 404
    [new] = system.wait_for_instances(model["id"], "running")
    assert new["id"] > old["id"]
    wait_until(lambda: not alive(old["pid"]), 10, "the deleted instance's process to end")


def test_stop_ends_the_backend_and_start_brings_it_back(system, deploy):
    model = deploy("stopped")
    [running] = system.wait_for_instances(model["id"], "running")
    with system.client() as c:
        stopped = c.post(f"/api/v1/models/{model['id']}/stop")
        assert stopped.status_code == 200 and stopped.json()["replicas"] == 0
        wait_until(lambda: not alive(running["pid"]), 10, "the backend to end")
        assert instances(system, model["id"]) == []
        assert c.post(f"/api/v1/models/{model['id']}/start").json()["replicas"] == 1
    system.wait_for_instances(model["id"], "running")


def test_killed_backend_is_detected_and_restarted_with_growing_backoff(system, deploy):
    model = deploy("crashy")
    [running] = system.wait_for_instances(model["id"], "running")
    os.kill(running["pid"], signal.SIGKILL)
    # detected within the 2 s check and restarted at once: well inside this deadline
    wait_until(lambda: instances(system, model["id"])[0]["restart_count"] == 1, 10, "the first restart")
    [restarted] = system.wait_for_instances(model["id"], "running", tolerate_errors=True)
    assert restarted["pid"] != running["pid"] and restarted["last_restart_at"]
    os.kill(restarted["pid"], signal.SIGKILL)
    [errored] = system.wait_for_instances(model["id"], "error", timeout=5)
    assert errored["state_message"] == "backend killed by signal SIGKILL"
    waited = (when(errored["next_restart_at"]) - when(errored["updated_at"])).total_seconds()
    assert 1.5 < waited < 3  # the second restart waits the base backoff (2 s in these tests)
    [again] = system.wait_for_instances(model["id"], "running", timeout=15, tolerate_errors=True)
    assert again["restart_count"] == 2


def test_rejected_backend_parameter_is_a_permanent_error_until_the_model_is_edited(system, deploy):
    model = deploy("badflag", backend_parameters=["--no-such-flag"])
    [errored] = system.wait_for_instances(model["id"], "error")
    assert "--no-such-flag" in errored["state_message"] and "not restarted automatically" in errored["state_message"]
    assert errored["error_kind"] == "permanent" and errored["next_restart_at"] is None
    time.sleep(3)  # a crash restarts at once and again 2 s later here: a permanent error does neither
    [still] = instances(system, model["id"])
    assert (still["id"], still["state"], still["restart_count"]) == (errored["id"], "error", 0)
    with system.client() as c:
        assert c.patch(f"/api/v1/models/{model['id']}", json={"backend_parameters": ["--ctx-size", "256"]}) \
            .status_code == 200
    [fixed] = system.wait_for_instances(model["id"], "running")
    assert fixed["id"] != errored["id"] and fixed["error_kind"] == ""


def test_edit_leaves_running_instances_alone_and_marks_them_outdated(system, deploy):
    model = deploy("edited")
    [running] = system.wait_for_instances(model["id"], "running")
    assert running["outdated"] is False
    with system.client() as c:
        edited = c.patch(f"/api/v1/models/{model['id']}", json={"backend_parameters": ["--ctx-size", "512"]})
        assert edited.status_code == 200
    [same] = instances(system, model["id"])
    assert (same["id"], same["pid"], same["state"], same["outdated"]) == (running["id"], running["pid"], "running",
                                                                          True)
    with system.client() as c:
        c.delete(f"/api/v1/instances/{same['id']}")
    [fresh] = system.wait_for_instances(model["id"], "running")
    assert fresh["outdated"] is False and fresh["computed_resource_claim"]["ctx_size"] == 512
