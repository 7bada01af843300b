"""A local path the server cannot see is accepted, and the worker reports the problem on the instance."""

import time


def test_missing_file_on_the_worker_is_a_permanent_instance_error(system):
    with system.client() as c:
        created = c.post("/api/v1/models", json={"name": "nowhere", "source": "local_path",
                                                 "local_path": "/no/such/dir/model.gguf"})
        assert created.status_code == 201, created.text
        [instance] = system.wait_for_instances(created.json()["id"], "error", timeout=30)
        assert "/no/such/dir/model.gguf does not exist on this worker" in instance["state_message"]
        assert "cannot read" not in instance["state_message"]
        assert instance["error_kind"] == "permanent" and instance["next_restart_at"] is None
        time.sleep(2.5)  # a crash would have restarted at once: a permanent error does not
        [still] = c.get(f"/api/v1/models/{created.json()['id']}/instances").json()
        assert (still["state"], still["restart_count"]) == ("error", 0)
        assert c.delete(f"/api/v1/models/{created.json()['id']}").status_code == 204
