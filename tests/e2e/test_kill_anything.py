"""kill -9 each process of a running `manage.py up` in turn — Redis, the web server, the scheduler, beat, the node
agent — and then the backend, while a client sends ~20 chat requests a second through the gateway. The dead child
is back within seconds; a control-plane death never interrupts the backend (a restarted node agent adopts it); the
instance ends running with one backend; SIGTERM afterwards still leaves nothing. Figures (time until the child is
back, until the model answers again, requests lost) are printed for the record, never asserted."""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass, field

import httpx
import psutil
import pytest

from tests.e2e.system import start_system, wait_until

# (name, what its command line holds): the children `up` supervises.
CHILDREN = [("redis", "redis-server"), ("web", "uvicorn"), ("scheduler", "-Q scheduler"), ("beat", " beat "),
            ("node agent", "manage.py worker")]


@dataclass
class Load:
    """A client sending chat requests through the gateway, ~20 a second, recording each outcome."""

    url: str
    key: str
    outcomes: list[tuple[float, bool]] = field(default_factory=list)
    stopping: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        body = {"model": "sturdy", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
        with httpx.Client(headers={"Authorization": f"Bearer {self.key}"}, timeout=5) as client:
            while not self.stopping.is_set():
                began = time.monotonic()
                try:
                    ok = client.post(self.url, json=body).status_code == 200
                except httpx.HTTPError:
                    ok = False
                self.outcomes.append((began, ok))
                self.stopping.wait(max(0.0, 0.05 - (time.monotonic() - began)))

    def since(self, moment: float) -> list[tuple[float, bool]]:
        return [o for o in self.outcomes if o[0] >= moment]


def child_pid(system, needle: str) -> int | None:
    for process in psutil.Process(system.popen.pid).children():
        try:
            if needle in " ".join(process.cmdline()):
                return process.pid
        except psutil.NoSuchProcess:
            continue
    return None


@pytest.fixture(scope="module")
def sturdy(tmp_path_factory, tiny_models):
    system = start_system(tmp_path_factory.mktemp("kill"), worker_name="kill-worker")
    with system.client() as c:
        model = c.post("/api/v1/models", json={"name": "sturdy", "source": "local_path",
                                               "local_path": str(tiny_models["chat"]),
                                               "backend_parameters": ["--ctx-size", "256"]}).json()
    [instance] = system.wait_for_instances(model["id"], "running")
    load = Load(f"{system.base_url}/v1/chat/completions", system.api_key)
    thread = threading.Thread(target=load.run, daemon=True)
    thread.start()
    wait_until(lambda: len(load.outcomes) > 20 and all(ok for _, ok in load.outcomes[-10:]), 30, "steady answers")
    yield system, model, instance, load
    load.stopping.set()
    thread.join(10)
    assert system.stop() == 0
    assert system.leftovers() == []


def backends_of(system, model_id) -> list[dict]:
    with system.client() as c:
        return c.get(f"/api/v1/models/{model_id}/instances").json()


@pytest.mark.parametrize(("name", "needle"), CHILDREN)
def test_a_killed_control_plane_process_comes_back_and_the_model_is_never_interrupted(sturdy, name, needle):
    system, model, instance, load = sturdy
    old = child_pid(system, needle)
    assert old is not None, f"no {name} child"
    killed_at = time.monotonic()
    os.kill(old, signal.SIGKILL)
    new = wait_until(lambda: (child_pid(system, needle) or old) != old and child_pid(system, needle), 30,
                     f"{name} to be back")
    back_after = time.monotonic() - killed_at
    wait_until(lambda: any(ok for _, ok in load.since(time.monotonic() - 0.5)), 30, "answers again")
    answering_after = max(0.0, min((t for t, ok in load.since(killed_at) if ok), default=killed_at) - killed_at)
    time.sleep(1)
    lost = sum(not ok for _, ok in load.since(killed_at))
    print(f"\nkill -9 {name}: back in {back_after:.1f} s (pid {old} → {new}); first answer after "
          f"{answering_after:.1f} s; {lost} of {len(load.since(killed_at))} requests failed")
    if name in ("node agent",):
        # Re-registered, and the backend adopted rather than restarted.
        wait_until(lambda: any(w["name"] == "kill-worker" and w["state"] == "ready"
                               for w in system.client().get("/api/v1/workers").json()), 30, "the worker ready")
    [now] = backends_of(system, model["id"])
    assert (now["state"], now["pid"], now["restart_count"]) == ("running", instance["pid"], 0), now
    assert psutil.pid_exists(instance["pid"])
    if name != "web":
        assert lost == 0, f"{lost} requests failed while {name} was down"


def test_a_killed_backend_is_restarted_once_and_only_once(sturdy):
    system, model, instance, load = sturdy
    killed_at = time.monotonic()
    os.kill(instance["pid"], signal.SIGKILL)
    [restarted] = wait_until(lambda: [i for i in backends_of(system, model["id"]) if i["state"] == "running"
                                      and i["pid"] != instance["pid"]] or None, 30, "the backend to be back")
    wait_until(lambda: any(ok for t, ok in load.since(time.monotonic() - 0.5)), 30, "answers again")
    answering_after = min((t for t, ok in load.since(killed_at) if ok), default=killed_at) - killed_at
    lost = sum(not ok for _, ok in load.since(killed_at))
    print(f"\nkill -9 backend: answering again after {answering_after:.1f} s; {lost} of "
          f"{len(load.since(killed_at))} requests failed")
    servers = [p for p in psutil.process_iter(["name", "cmdline"])
               if p.info["name"] == "llama-server" and "sturdy" in " ".join(p.info["cmdline"] or [])]
    assert [p.pid for p in servers] == [restarted["pid"]] and restarted["restart_count"] == 1
