"""The parts this worker runs of distributed instances whose main backend runs on another worker: one RPC server
(llama.cpp's `ggml-rpc-server`) per entry of the instance's `distributed_servers` that names this worker.

A part belongs to one attempt of its instance: the server starts the parts over (a new `attempt`) whenever the
instance fails or restarts, and a part of an older attempt is ended. A part that dies fails the whole instance,
which restarts as a group; the main starts only once every part has said it is ready.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from django.conf import settings

from models_app.choices import InstanceState, SourceChoices
from workers_app import processes
from workers_app.backends import get_backend
from workers_app.backends.base import BackendError, PartSpec, distributed_master_port
from workers_app.processes import BackendProcess

if TYPE_CHECKING:
    from workers_app.agent import NodeAgent
    from workers_app.server_link import Assignment

logger = logging.getLogger(__name__)
S = InstanceState
ACTIVE = (S.SCHEDULED, S.DOWNLOADING, S.INITIALIZING, S.STARTING, S.RUNNING, S.UNREACHABLE)
READY_TIMEOUT = 30.0  # seconds for a started RPC server to accept connections
SETTLE_SECONDS = 3.0  # a part that does not listen (a headless vLLM node) counts as started once up this long


@dataclass
class Part:
    instance_id: int
    index: int
    attempt: int
    proc: BackendProcess
    told_ready: bool = False
    label: str = "RPC server"  # what the part is, in messages: its backend's `part_label`

    @property
    def key(self) -> str:
        return part_key(self.instance_id, self.index)


def part_key(instance_id: int, index: int) -> str:
    return f"part-{instance_id}-{index}"


class PartRunner:
    def __init__(self, agent: NodeAgent):
        self.agent = agent
        self.parts: dict[tuple[int, int], Part] = {}
        self.starting: set[tuple[int, int]] = set()
        self.failed: set[tuple[int, int, int]] = set()  # (instance, index, attempt) that died: told, not restarted
        self.lock = threading.Lock()

    def ports(self) -> set[int]:
        with self.lock:
            return {p.proc.port for p in self.parts.values()}

    def wake(self) -> None:
        self.agent.sync_soon()

    def _wanted(self, view: dict[int, Assignment]) -> dict[tuple[int, int], tuple[Assignment, dict]]:
        worker_id = self.agent.worker_id
        return {(a.pk, index): (a, entry) for a in view.values() if a.state in ACTIVE
                for index, entry in a.parts_on(worker_id)}

    def adopt_leftovers(self, view: dict[int, Assignment]) -> None:
        """RPC servers a previous run of this agent left: kept when the server still counts on them (same attempt,
        same pid, ready), ended otherwise."""
        wanted = self._wanted(view)
        for record in processes.recorded_processes(self.agent.data_dir):
            key = str(record.get("key", ""))
            if not key.startswith("part-"):
                continue
            slot = (record.get("instance_id"), record.get("index"))
            entry = wanted.get(slot, (None, {}))[1]
            same = processes.is_same_process(record)
            if same and entry.get("pid") == record.get("pid") and entry.get("attempt", 0) == record.get("attempt") \
                    and entry.get("state") == "ready":
                proc = BackendProcess(slot[0], None, record["pid"], record["port"], self.agent.ip,
                                      self._log_path(*slot), time.monotonic(), healthy_once=True, adopted=True)
                self.parts[slot] = Part(slot[0], slot[1], record["attempt"], proc, told_ready=True)
                logger.info("adopted RPC server pid %s of instance %s", record["pid"], slot[0])
                continue
            if same:
                processes.terminate_group(record["pid"])
            processes.remove_pidfile(self.agent.data_dir, key)

    def sync(self, view: dict[int, Assignment], reachable: bool) -> None:
        """Make what runs here match the server's view: end parts it no longer wants (deleted, moved, failed, an
        older attempt), report parts that died, start the ones it wants."""
        wanted = self._wanted(view)
        with self.lock:
            current = dict(self.parts)
        for slot, part in current.items():
            returncode = part.proc.poll()
            if returncode is not None:
                self._forget(part)
                with self.lock:  # the next attempt starts it again, not this one
                    self.failed.add((part.instance_id, part.index, part.attempt))
                exited = "exited" if part.proc.adopted else processes.describe_exit(returncode)
                lines = processes.tail_lines(part.proc.log_path, 5)
                self._tell_failed(part.instance_id, part.index, part.attempt,
                                  f"{part.label} {exited}" + (f": {lines[-1].strip()}" if lines else ""))
                continue
            if not reachable:
                continue  # the server cannot be asked: what runs keeps running
            entry = wanted.get(slot, (None, None))[1]
            if entry is None or int(entry.get("attempt") or 0) != part.attempt:
                self._end(part, "no longer wanted" if entry is None else "an earlier attempt")
            elif entry.get("state") != "ready" or entry.get("pid") != part.proc.pid:
                self._tell_ready(part)  # the first report was lost, or the view predates it
        if not reachable:
            return
        with self.lock:
            self.failed &= {(*slot, int(entry.get("attempt") or 0)) for slot, (_, entry) in wanted.items()}
        for slot, (assignment, entry) in wanted.items():
            with self.lock:
                if slot in self.parts or slot in self.starting or self.agent.stopping.is_set() \
                        or (*slot, int(entry.get("attempt") or 0)) in self.failed:
                    continue
                self.starting.add(slot)
            threading.Thread(target=self._start, args=(assignment, slot[1], entry), daemon=True,
                             name=f"part-{slot[0]}-{slot[1]}").start()

    def _log_path(self, instance_id: int, index: int) -> Path:
        return self.agent.data_dir / "logs" / "instances" / f"{instance_id}.part{index}.log"

    def _start(self, assignment: Assignment, index: int, entry: dict) -> None:
        slot = (assignment.pk, index)
        attempt = int(entry.get("attempt") or 0)
        try:
            part = self._launch(assignment, index, entry, attempt)
            if part is not None:
                self._tell_ready(part)
        except BackendError as exc:
            with self.lock:
                self.failed.add((assignment.pk, index, attempt))
            self._tell_failed(assignment.pk, index, attempt, str(exc))
        except Exception as exc:  # never leave a part half-started
            logger.exception("part %s of instance %s could not be started", index, assignment.name)
            with self.lock:
                self.failed.add((assignment.pk, index, attempt))
            self._tell_failed(assignment.pk, index, attempt, f"{type(exc).__name__}: {exc}")
        finally:
            with self.lock:
                self.starting.discard(slot)

    def _launch(self, assignment: Assignment, index: int, entry: dict, attempt: int) -> Part | None:
        agent = self.agent
        backend = get_backend(assignment.backend or assignment.model.backend or "llama-box")
        version = assignment.backend_version or assignment.model.backend_version or backend.default_version
        variant = backend.variant(agent.node)
        installation = backend.find(version, variant)
        if installation is None:
            ok, reason = backend.installable(agent.node)
            if not ok:
                raise BackendError(f"{backend.name} cannot run on worker {agent.name}: {reason}", permanent=True)
            logger.info("instance %s: installing %s %s for its RPC server", assignment.name, backend.name, version)
            installation = backend.install(version, variant, lambda line: None)
        with agent.lock:
            taken = {p.port for p in agent.processes.values()} | self.ports()
            port = processes.free_port(agent.ip, *settings.BACKEND_PORT_RANGE, taken)
        gpus = list(entry.get("gpu_indexes") or [])
        model = assignment.model
        part_spec = PartSpec(
            installation=installation, host=agent.ip, port=port, threads=os.cpu_count() or 1, index=index,
            gpu_indexes=gpus, claim=dict(entry.get("computed_resource_claim") or {}), model_name=model.name,
            model_path=self._model_path(backend, assignment), backend_parameters=list(model.backend_parameters or []),
            main_host=assignment.main_host, master_port=distributed_master_port(assignment.pk, attempt),
            env=dict(model.env or {}), tmp_dir=agent.tmp_root / f"{assignment.pk}-part{index}")
        cmd = backend.part_command(part_spec)
        log_path = self._log_path(assignment.pk, index)
        popen = processes.start(cmd, env=backend.part_environment(part_spec), log_path=log_path)
        proc = BackendProcess(assignment.pk, popen, popen.pid, port, agent.ip, log_path, time.monotonic())
        part = Part(assignment.pk, index, attempt, proc, label=backend.part_label)
        with self.lock:
            self.parts[(assignment.pk, index)] = part
        processes.write_pidfile(agent.data_dir, proc, agent.name, key=part.key, index=index, attempt=attempt)
        logger.info("instance %s: %s %s (attempt %s) started, pid %s on %s:%s", assignment.name, part.label, index,
                    attempt, popen.pid, agent.ip, port)
        if backend.part_listens and not self._accepts(proc):
            self._forget(part)
            processes.terminate_group(proc.pid, proc.popen)
            raise BackendError(f"RPC server did not accept connections on {agent.ip}:{port} within "
                               f"{READY_TIMEOUT:.0f} s")
        if not backend.part_listens and not self._settles(proc):
            self._forget(part)
            lines = processes.tail_lines(log_path, 3)
            raise BackendError(f"{part.label} {processes.describe_exit(proc.poll() or 0)} as it started"
                               + (f": {lines[-1].strip()}" if lines else ""))
        return part

    def _model_path(self, backend, assignment: Assignment) -> Path | None:
        """The model's files here, for a part that loads them itself (a vLLM node): a local path only; a hub model's
        nodes would each download it, which the main's download does not cover yet."""
        if not backend.part_needs_model:
            return None
        model = assignment.model
        if model.source != SourceChoices.LOCAL_PATH:
            raise BackendError(f"a {backend.name} node on another worker needs the model's files there: deploy "
                               f"from a local path present on every worker", permanent=True)
        return backend.resolve_model_path(Path(model.local_path))

    def _settles(self, proc: BackendProcess) -> bool:
        """A part that does not listen: still alive after SETTLE_SECONDS."""
        deadline = time.monotonic() + SETTLE_SECONDS
        while time.monotonic() < deadline and not self.agent.stopping.is_set():
            if proc.poll() is not None:
                return False
            time.sleep(0.1)
        return proc.poll() is None

    def _accepts(self, proc: BackendProcess) -> bool:
        """Connectable (and not dead) within READY_TIMEOUT. The probe connection is closed at once; the RPC server
        takes it as a client that left."""
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline and not self.agent.stopping.is_set():
            if proc.poll() is not None:
                return False
            try:
                with socket.create_connection((proc.host, proc.port), timeout=0.5):
                    return True
            except OSError:
                time.sleep(0.05)
        return False

    def _tell_ready(self, part: Part) -> None:
        part.told_ready = self.agent._report("part_ready", part.instance_id, index=part.index, attempt=part.attempt,
                                             host=part.proc.host, port=part.proc.port, pid=part.proc.pid)

    def _tell_failed(self, instance_id: int, index: int, attempt: int, message: str) -> None:
        self.agent._report("part_failed", instance_id, index=index, attempt=attempt, message=message)
        self.wake()

    def _forget(self, part: Part) -> None:
        with self.lock:
            self.parts.pop((part.instance_id, part.index), None)
        processes.remove_pidfile(self.agent.data_dir, part.key)

    def _end(self, part: Part, why: str) -> None:
        self._forget(part)
        processes.terminate_group(part.proc.pid, part.proc.popen, grace=1.0)  # it has no SIGTERM handler
        logger.info("instance %s: %s %s ended (%s)", part.instance_id, part.label, part.index, why)

    def stop_all(self) -> None:
        with self.lock:
            current = list(self.parts.values())
        for part in current:
            self._end(part, "the worker stops")
