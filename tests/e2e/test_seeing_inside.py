"""Seeing inside a running system: what a backend really uses beside its claim (and the flag when it uses more), why
it was placed where it is, and its history through a crash and a restart."""

import os
import signal

import httpx
import psutil
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import METRICS_TOKEN
from tests.e2e.system import wait_until


def instance(system, pk: int) -> dict:
    with system.client() as c:
        return c.get(f"/api/v1/instances/{pk}").json()


def tree_memory(pid: int) -> tuple[int, int]:
    """(PSS, RSS) of the process tree, read here."""
    root = psutil.Process(pid)
    tree = (root, *root.children(recursive=True))
    return sum(p.memory_full_info().pss for p in tree), sum(p.memory_info().rss for p in tree)


def test_measured_memory_sits_beside_the_claim_and_using_more_is_flagged(system, deploy):
    model = deploy("measured")
    [running] = system.wait_for_instances(model["id"], "running")
    measured = wait_until(lambda: instance(system, running["id"])["measured"] or None, 30, "a measurement")
    pss, rss = tree_memory(running["pid"])
    assert 0.7 * pss <= measured["ram"] <= 1.1 * rss, (measured, pss, rss)  # what the process really holds
    assert measured["vram"] == {} and measured["over_claim"] == ""  # no GPU here; the estimate held
    why = running["placement_explanation"]
    assert why["chosen"]["worker_name"] == running["worker_name"] and why["strategy"] == "spread"

    # The estimate was too small: the next sample says so, with the numbers, and the history has it once.
    system.manage("shell", "-c", "from models_app.models import ModelInstance; ModelInstance.objects.filter("
                                 f"pk={running['id']}).update(computed_resource_claim={{'ram': 1024 * 1024}})")
    flagged = wait_until(lambda: instance(system, running["id"])["measured"]["over_claim"], 30, "the over-claim flag")
    assert flagged.startswith("RAM: uses ") and "claimed 0.00 GiB" in flagged
    with system.client() as c:
        causes = [e["cause"] for e in c.get(f"/api/v1/instances/{running['id']}/events").json()]
    assert causes.count("over_claim") == 1 and causes.index("over_claim") > causes.index("healthy")


def test_the_history_of_a_crash_and_restart_is_kept_in_order(system, deploy):
    model = deploy("crashing")
    [running] = system.wait_for_instances(model["id"], "running")
    os.kill(running["pid"], signal.SIGKILL)
    wait_until(lambda: instance(system, running["id"])["restart_count"] >= 1
               and instance(system, running["id"])["state"] == "running", 60, "the restart")
    with system.client() as c:
        events = c.get(f"/api/v1/instances/{running['id']}/events").json()
    steps = [(e["cause"], e["to_state"]) for e in events]
    crash = steps.index(("failed", "error"))
    assert steps[:2] == [("analyzing", "analyzing"), ("placed", "scheduled")]
    assert ("healthy", "running") in steps[:crash]
    assert steps[crash + 1:] == [("restart", "scheduled"), ("start", "starting"), ("healthy", "running")]
    assert "SIGKILL" in events[crash]["message"]


def scrape(system) -> dict[tuple[str, tuple], float]:
    response = httpx.get(f"{system.base_url}/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
    assert response.status_code == 200
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(response.text) for sample in family.samples}


def test_prometheus_reads_the_cluster_and_its_counters_move(system, deploy, inference_key):
    assert httpx.get(f"{system.base_url}/metrics").status_code == 401
    model = deploy("metered")
    system.wait_for_instances(model["id"], "running")
    requests = ("aimind_gateway_requests_total", (("model", "metered"), ("status", "2xx")))
    before = scrape(system).get(requests, 0)
    gateway = httpx.Client(base_url=system.base_url, timeout=30,
                           headers={"Authorization": f"Bearer {inference_key['key']}"})
    for _ in range(2):
        assert gateway.post("/v1/chat/completions", json={"model": "metered", "max_tokens": 4, "messages": [
            {"role": "user", "content": "hi"}]}).status_code == 200
    after = wait_until(lambda: (found := scrape(system)).get(requests, 0) == before + 2 and found, 60,
                       "the gateway's counts to reach /metrics", interval=0.5)
    assert after[("aimind_instances", (("model", "metered"), ("state", "running")))] == 1
    assert after[("aimind_gateway_tokens_total", (("kind", "completion"), ("model", "metered")))] > 0
    assert after[("aimind_gateway_request_duration_seconds_count", (("model", "metered"),))] >= 2
    assert after[("aimind_scheduler_placements_total", ())] >= 1
    assert after[("aimind_workers", (("state", "ready"),))] >= 1
