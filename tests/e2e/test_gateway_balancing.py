"""The gateway on a real system (real llama-servers): a key revoked elsewhere stops within about a second, usage is
counted, a client that hangs up stops the generation, and a replica that dies costs no request."""

import os
import re
import signal

import httpx

from tests.e2e.system import wait_until

CHAT = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 8}


def test_a_key_revoked_by_another_process_stops_within_a_second(system, inference_key):
    gateway = httpx.Client(base_url=system.base_url, timeout=10,
                           headers={"Authorization": f"Bearer {inference_key['key']}"})
    assert {gateway.get("/v1/models").status_code for _ in range(5)} == {200}
    # Revoked from a `manage.py shell`: the web server hears of it through Redis only.
    system.manage("shell", "-c", f"from gateway_app.models import ApiKey; ApiKey.objects.get(pk={inference_key['id']})"
                                 f".revoke()")
    wait_until(lambda: gateway.get("/v1/models").status_code == 401, 5, "the revoked key to stop", interval=0.05)
    assert {gateway.get("/v1/models").status_code for _ in range(10)} == {401}


def test_usage_is_counted_per_model_and_key(system, deploy, inference_key):
    model = deploy("usage-chat")
    system.wait_for_instances(model["id"], "running")
    gateway = httpx.Client(base_url=system.base_url, timeout=30,
                           headers={"Authorization": f"Bearer {inference_key['key']}"})
    plain = gateway.post("/v1/chat/completions", json={"model": "usage-chat", **CHAT}).json()["usage"]
    with gateway.stream("POST", "/v1/chat/completions", json={"model": "usage-chat", "stream": True, **CHAT,
                                                              "stream_options": {"include_usage": True}}) as s:
        assert s.status_code == 200 and "[DONE]" in s.read().decode()
    with system.client() as c:
        def counted():
            rows = c.get("/api/v1/keys/usage", params={"key": inference_key["id"]}).json()["models"]
            return rows if rows and rows[0]["requests"] == 2 else None

        [row] = wait_until(counted, 60, "the usage to be written", interval=0.5)
    assert row["model"] == "usage-chat"
    assert row["prompt_tokens"] >= 2 * plain["prompt_tokens"] > 0
    assert row["completion_tokens"] >= plain["completion_tokens"] > 0


def test_hanging_up_on_a_stream_stops_the_generation(system, deploy):
    model = deploy("long-chat", backend_parameters=["--ctx-size", "2048", "--parallel", "1"])
    [instance] = system.wait_for_instances(model["id"], "running")
    body = {"model": "long-chat", "stream": True, "max_tokens": 2000, "ignore_eos": True,
            "messages": [{"role": "user", "content": "hello"}]}
    with httpx.Client(base_url=system.base_url, timeout=30,
                      headers={"Authorization": f"Bearer {system.api_key}"}) as gateway:
        with gateway.stream("POST", "/v1/chat/completions", json=body) as stream:
            next(stream.iter_raw())  # the first chunk, then hang up
    with system.client() as c:
        def released():  # llama-server's own account: the task cancelled, the slot let go early
            log = c.get(f"/api/v1/instances/{instance['id']}/logs", params={"tail": 50}).text
            ends = re.findall(r"stop processing: n_tokens = (\d+)", log)
            return (log, int(ends[-1])) if "cancel task" in log and ends else None

        log, tokens = wait_until(released, 30, "llama-server to cancel the generation")
    assert tokens < 2000, log


def test_a_replica_that_dies_costs_no_request(system, deploy):
    model = deploy("sturdy-chat", replicas=2)
    victim, _ = system.wait_for_instances(model["id"], "running", count=2)
    gateway = httpx.Client(base_url=system.base_url, timeout=30,
                           headers={"Authorization": f"Bearer {system.api_key}"})
    assert gateway.post("/v1/chat/completions", json={"model": "sturdy-chat", **CHAT}).status_code == 200
    os.kill(victim["pid"], signal.SIGKILL)  # its port now refuses: the gateway passes requests to the other one
    statuses = [gateway.post("/v1/chat/completions", json={"model": "sturdy-chat", **CHAT}).status_code
                for _ in range(12)]
    assert statuses == [200] * 12
