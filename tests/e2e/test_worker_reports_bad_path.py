"""A local path the server cannot see is accepted, and the worker reports the problem on the instance."""


def test_missing_file_on_the_worker_is_an_instance_error(system):
    with system.client() as c:
        created = c.post("/api/v1/models", json={"name": "nowhere", "source": "local_path",
                                                 "local_path": "/no/such/dir/model.gguf"})
        assert created.status_code == 201, created.text
        [instance] = system.wait_for_instances(created.json()["id"], "error", timeout=30)
        assert "/no/such/dir/model.gguf does not exist on this worker" in instance["state_message"]
        assert "cannot read" not in instance["state_message"]
        assert c.delete(f"/api/v1/models/{created.json()['id']}").status_code == 204
