"""The product itself, for the benchmarks that measure it: `up` on this machine (tests/e2e/system.start_system, with
its own data dir and the llama.cpp build made at set-up) and a local GGUF deployed on it until its instance runs."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.e2e.system import RunningSystem, start_system  # noqa: E402, F401  (start_system: for the benchmarks)


def deploy(system: RunningSystem, name: str, path: Path, parameters: Sequence[str] = (),
           timeout: float = 120) -> dict:
    """A one-replica model from the local file `path`, with these backend parameters: its instance (the API's
    form) once it runs. Raises AssertionError, with the instance's message, when it fails or does not run in time."""
    with system.client() as c:
        created = c.post("/api/v1/models", json={"name": name, "source": "local_path", "replicas": 1,
                                                 "local_path": str(path), "backend_parameters": list(parameters)})
        assert created.status_code == 201, created.text
    [instance] = system.wait_for_instances(created.json()["id"], "running", timeout=timeout)
    return instance
