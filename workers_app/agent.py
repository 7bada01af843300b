"""The node agent: joins the cluster, heartbeats, launches backends and watches them.

It lives in the same process as this worker's Celery consumer (threads pool), so the launch task and the supervisor
share the Popen objects and see real exit codes. It holds no database connection: it reads what it is to run from
the server's API (`ServerLink`) and reports each thing that happens there; the server applies the lifecycle.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path

import httpx
from django.conf import settings

from models_app.choices import InstanceState
from workers_app import inventory, logs, measure, processes
from workers_app.backends import get_backend
from workers_app.launching import Launching
from workers_app.parts import PartRunner
from workers_app.processes import BackendProcess
from workers_app.server_link import Assignment, NameTaken, ServerLink, ServerUnreachable

logger = logging.getLogger(__name__)
S = InstanceState

HEALTH_FAILURES_BEFORE_ERROR = 3
ALIVE_NOTE_SECONDS = 30.0  # an install's progress reaches the instance at most this often
RUNNING_STATES = (S.STARTING, S.RUNNING, S.UNREACHABLE)  # a backend process belongs to the instance
STARTING_POLL_SECONDS = 0.05  # a starting backend is polled fast: deploy-to-running latency is a product goal
UNKNOWN_CLAIM_MESSAGE = ("resource claim unknown: the server could not read the model's metadata, so no memory "
                         "was booked for it")
_current: NodeAgent | None = None


def current_agent() -> NodeAgent:
    if _current is None:
        raise RuntimeError("no node agent runs in this process (start it with `manage.py worker`)")
    return _current


class NodeAgent(Launching):
    def __init__(self, *, name: str, server_url: str, token: str, ip: str, data_dir: Path, labels: dict | None = None,
                 system_reserved: dict | None = None, link: ServerLink | None = None):
        self.name = name
        self.ip = ip
        self.data_dir = data_dir
        self.labels = labels or {}
        self.system_reserved = system_reserved or {}
        self.link = link or ServerLink(server_url, token, data_dir / "worker-credential")
        self.processes: dict[int, BackendProcess] = {}
        self.preparing: set[int] = set()  # instances downloading, installing or about to start, in their own thread
        self.view: dict[int, Assignment] = {}  # the server's view of this worker's instances, as last read
        self.view_read_at = 0.0
        self.told_at: dict[int, float] = {}  # when a report's answer last updated an instance's view
        self.noted_alive_at = 0.0
        self.health_http = httpx.Client(timeout=1.0)
        self.node = inventory.node_info()
        # Backends' TMPDIRs, short (vLLM's IPC socket paths must fit in 107 bytes), one folder per data dir.
        self.tmp_root = Path(tempfile.gettempdir()) / f"aimind-{hashlib.sha1(str(data_dir).encode()).hexdigest()[:8]}"
        self.lock = threading.RLock()
        self.stopping = threading.Event()
        self.wake = threading.Event()  # look at the server's view now (a launch, a stop, a failed start)
        self.registered = threading.Event()
        self.parts = PartRunner(self)
        self.threads: list[threading.Thread] = []
        self.shipper: logs.LogShipper | None = None
        self.attach_log_shipper()

    def attach_log_shipper(self) -> None:
        """Ship logs to the cluster's Redis, once its address is known (it comes with the registration)."""
        if self.shipper is None:
            redis_conn = logs.client()
            self.shipper = logs.LogShipper(redis_conn) if redis_conn is not None else None

    @property
    def worker_id(self) -> int | None:
        return self.link.worker_id

    # Joining.

    def registration(self) -> dict:
        body = {"name": self.name, "hostname": socket.gethostname(), "ip": self.ip, "labels": self.labels,
                "status": self.status()[0]}
        if self.system_reserved:
            body["system_reserved"] = self.system_reserved
        return body

    def join(self, attempts: int | None = None) -> dict:
        """Register, waiting for the server as long as it takes (or `attempts` tries). Returns its answer (the broker
        address among it). A wrong token or a name another live worker holds stops here with the server's reason."""
        delay, tried = 0.2, 0
        while True:
            tried += 1
            try:
                answer = self.link.register(self.registration())
            except ServerUnreachable as exc:
                if self.stopping.is_set() or (attempts is not None and tried >= attempts):
                    raise
                logger.info("server not answering yet (%s); retrying in %.1f s", exc, delay)
                self.stopping.wait(delay)
                delay = min(delay * 2, settings.HEARTBEAT_INTERVAL)
                continue
            logger.info("worker %s registered as id %s", self.name, answer["id"])
            self.registered.set()
            return answer

    def start(self) -> None:
        """After `join`: take over what a previous run left, start what is due, and keep watching."""
        global _current
        _current = self
        self._refresh_view(force=True, quiet=True)
        self._adopt_leftover_processes()
        self.parts.adopt_leftovers(self.view)
        self._relaunch_own_instances()
        loops = [(self._heartbeat_loop, "heartbeat"), (self._supervise_loop, "supervisor")]
        if self.shipper is not None:
            loops.append((self._ship_loop, "log-shipper"))
        for target, name in loops:
            thread = threading.Thread(target=target, name=f"agent-{name}", daemon=True)
            thread.start()
            self.threads.append(thread)

    def _adopt_leftover_processes(self) -> None:
        """Backends a previous run of this worker left (it was killed, not stopped): the ones that are still the
        process it started (pid and start time) and still this worker's instance, starting or running, are adopted
        — the model is not interrupted by the agent's restart; the health check judges them from now on. Any
        other is ended."""
        for record in processes.recorded_processes(self.data_dir):
            if str(record.get("key", record.get("instance_id"))).startswith("part-"):
                continue  # the parts runner's own
            instance = self.view.get(record.get("instance_id"))
            adoptable = (instance is not None and instance.role == "main" and record.get("worker") == self.name
                         and instance.pid == record.get("pid") and instance.state in RUNNING_STATES)
            if processes.is_same_process(record) and adoptable:
                log_path = self._log_path(instance.pk)
                proc = BackendProcess(instance.pk, None, record["pid"], record["port"], self.ip, log_path,
                                      time.monotonic(), healthy_once=instance.state != S.STARTING, adopted=True,
                                      attempt=int(record.get("attempt") or 0))
                self.processes[instance.pk] = proc
                if self.shipper is not None:
                    self.shipper.start_at_end(instance.pk, log_path, proc.attempt)
                logger.info("adopted running backend pid %s of instance %s", record["pid"], instance.name)
                continue
            if processes.is_same_process(record):
                logger.info("ending leftover backend pid %s of instance %s", record["pid"], record["instance_id"])
                processes.terminate_group(record["pid"])
            processes.remove_pidfile(self.data_dir, record["instance_id"])

    def _relaunch_own_instances(self) -> None:
        """After this worker's (re)start: what was this worker's and runs no adopted process starts again."""
        with self.lock:
            mine = set(self.processes) | self.preparing
        stranded = [a.pk for a in self.view.values() if a.role == "main" and a.pk not in mine
                    and a.state in (S.INITIALIZING, S.DOWNLOADING, *RUNNING_STATES)]
        if stranded:
            self._report("returning", instances=stranded, message=f"worker {self.name} restarted; starting again",
                         cause="worker_restarted")
            self._refresh_view(force=True, quiet=True)
        for assignment in list(self.view.values()):
            if assignment.role == "main" and assignment.state == S.SCHEDULED:
                self.launch(assignment.pk)

    def status(self) -> tuple[dict, dict]:
        """The inventory (with what processes outside the product hold on each GPU) and what each backend uses."""
        with self.lock:
            running = {pk: proc.pid for pk, proc in self.processes.items()}
        # The product's processes: this worker and its children, and what it adopted or left (the pidfiles).
        product = [os.getpid(), *(r["pid"] for r in processes.recorded_processes(self.data_dir)
                                  if processes.is_same_process(r))]
        try:
            measured, others = measure.sample(running, product)
        except Exception:  # a measurement must never cost the heartbeat
            logger.exception("could not measure the backends' memory")
            measured, others = {}, None
        return inventory.system_status(used_by_others=others), measured

    def heartbeat(self) -> None:
        status, measured = self.status()
        if not self.link.heartbeat(status, measured):  # deleted, or not ours: join again
            self.link.register(self.registration())

    def _heartbeat_loop(self) -> None:
        while not self.stopping.wait(settings.HEARTBEAT_INTERVAL):
            try:
                self.heartbeat()
            except (ServerUnreachable, NameTaken, PermissionError) as exc:
                logger.info("heartbeat to %s failed (%s); backends keep running", self.link.server_url, exc)
            except Exception:  # the heartbeat must outlive any surprise
                logger.exception("heartbeat failed")

    # The server's view.

    def _report(self, event: str, instance_id: int | None = None, **data) -> bool:
        """Tell the server; False when it did not apply (the instance moved on) or could not be told. The answer's
        view of the instance replaces ours."""
        try:
            applied, current = self.link.report(event, instance_id, **data)
        except ServerUnreachable as exc:
            logger.warning("could not report %s of instance %s: %s", event, instance_id, exc)
            return False
        if instance_id is not None:
            with self.lock:
                if current is None:
                    self.view.pop(instance_id, None)
                else:
                    self.view[instance_id] = current
                self.told_at[instance_id] = time.monotonic()
        return applied

    def _refresh_view(self, force: bool = False, quiet: bool = False) -> bool:
        if not force and time.monotonic() - self.view_read_at < settings.HEALTH_CHECK_INTERVAL:
            return True
        asked_at = time.monotonic()
        try:
            found = self.link.assignments()
        except ServerUnreachable as exc:
            if not quiet:
                logger.info("server unreachable (%s); backends keep running as they are", exc)
            return False
        with self.lock:
            # A report answered while this read was under way knows better than the read.
            newer = {pk: self.view.get(pk) for pk, at in self.told_at.items() if at > asked_at}
            self.view = {a.pk: a for a in found}
            for pk, assignment in newer.items():
                if assignment is None:
                    self.view.pop(pk, None)
                else:
                    self.view[pk] = assignment
            self.told_at = {pk: at for pk, at in self.told_at.items() if at > asked_at}
            self.view_read_at = time.monotonic()
        return True

    def sync_soon(self) -> None:
        self.view_read_at = 0.0
        self.wake.set()

    def stop_instance(self, instance_id: int) -> None:
        with self.lock:
            proc = self.processes.pop(instance_id, None)
        if proc is not None:
            processes.terminate_group(proc.pid, proc.popen)
            processes.remove_pidfile(self.data_dir, instance_id)
            self._close_log(proc, proc.popen.returncode if proc.popen else None, "stopped")
            logger.info("instance %s: backend pid %s ended", instance_id, proc.pid)
        self.parts.wake()
        try:
            gone = self.link.assignment(instance_id) is None
        except ServerUnreachable:
            gone = False
        if gone:  # deleted (or moved): its log and files here go with it
            logs.forget([instance_id])
            shutil.rmtree(self.data_dir / "work" / str(instance_id), ignore_errors=True)
            shutil.rmtree(self.tmp_root / str(instance_id), ignore_errors=True)

    # Logs.

    def _ship(self, proc: BackendProcess) -> None:
        if self.shipper is None:
            return
        try:
            self.shipper.ship(proc.instance_id, proc.log_path)
        except (OSError, logs.redis.RedisError) as exc:
            logger.warning("could not ship the log of instance %s: %s", proc.instance_id, exc)

    def _close_log(self, proc: BackendProcess, exit_code: int | None, how: str) -> None:
        """The backend ended: its last lines shipped, and its attempt's record says when and how."""
        self._ship(proc)
        logs.end_attempt(proc.instance_id, proc.log_path, proc.attempt, exit_code, how,
                         self.shipper.conn if self.shipper else None)

    def _ship_loop(self) -> None:
        """New log lines reach Redis within a fraction of a second (the WebSocket promises < 1 s)."""
        while not self.stopping.wait(0.2):
            with self.lock:
                current = list(self.processes.values())
            for proc in current:
                self._ship(proc)

    # Supervision.

    def _next_check_in(self) -> float:
        with self.lock:
            starting = any(not p.healthy_once for p in self.processes.values())
        interval = settings.HEALTH_CHECK_INTERVAL
        return min(STARTING_POLL_SECONDS, interval) if starting else interval

    def _supervise_loop(self) -> None:
        while not self.stopping.is_set():
            self.wake.wait(self._next_check_in())
            self.wake.clear()
            if self.stopping.is_set():
                return
            try:
                self.supervise_once()
            except Exception:  # the supervisor must outlive any single bad check
                logger.exception("supervisor check failed")

    def supervise_once(self) -> None:
        reachable = self._refresh_view()
        self._check_processes()
        self.parts.sync(self.view, reachable)
        if reachable:
            self._restart_due()
            self._start_what_has_no_process()
            self._note_preparing_alive()

    def _note_preparing_alive(self) -> None:
        """Downloads and installs in progress are alive, however quiet: the stuck sweep must leave them alone."""
        now = time.monotonic()
        if now - self.noted_alive_at < ALIVE_NOTE_SECONDS:
            return
        self.noted_alive_at = now
        with self.lock:
            preparing = list(self.preparing)
        if preparing:
            self._report("alive", instances=preparing)

    def _restart_due(self) -> None:
        """Errored instances of this worker whose backoff has run out start again, here."""
        for instance in [a for a in self.view.values() if a.role == "main" and a.restart_due]:
            with self.lock:
                busy = instance.pk in self.processes or instance.pk in self.preparing
            if not busy and self._report("restart", instance.pk):
                self.launch(instance.pk)

    def _start_what_has_no_process(self) -> None:
        """The server's view against what runs here: a scheduled instance whose launch request was lost starts; one
        the server believes running with no process here (it ended while the server was unreachable) fails, and
        restarts with the usual backoff."""
        with self.lock:
            busy = set(self.processes) | self.preparing
            view = [a for a in self.view.values() if a.role == "main" and a.pk not in busy]
        for instance in view:
            if instance.state == S.SCHEDULED:
                self.launch(instance.pk)
            elif instance.state in RUNNING_STATES:
                self._report("failed", instance.pk, message=f"backend is not running on worker {self.name}",
                             from_states=list(RUNNING_STATES))

    def _check_processes(self) -> None:
        with self.lock:
            current = dict(self.processes)
            view = dict(self.view)
        for instance_id, proc in current.items():
            instance = view.get(instance_id)
            if instance is None or instance.role != "main":
                self.stop_instance(instance_id)  # deleted or moved: its process must not outlive it
                continue
            returncode = proc.poll()
            if returncode is not None:
                self._on_exit(instance, proc, returncode)
            elif instance.state in RUNNING_STATES:
                self._check_health(instance, proc)
            elif instance.state in (S.ERROR, S.SCHEDULED, S.PENDING):
                # Failed elsewhere (one of its RPC parts died) or to be started afresh: this process is over.
                self.stop_instance(instance_id)

    def _on_exit(self, instance: Assignment, proc: BackendProcess, returncode: int) -> None:
        with self.lock:
            self.processes.pop(instance.pk, None)
        processes.remove_pidfile(self.data_dir, instance.pk)
        # An adopted process is not this agent's child: how it ended is not known, only that it did.
        exited = "exited" if proc.adopted else processes.describe_exit(returncode)
        self._close_log(proc, None if proc.adopted else returncode, exited)  # the last lines usually say why
        backend = get_backend(instance.backend or instance.model.backend or "llama-box")
        lines = processes.tail_lines(proc.log_path)
        cause = backend.error_from_log(lines)
        permanent = backend.exit_is_permanent(returncode, lines, proc.healthy_once) and not proc.adopted
        when = "" if proc.healthy_once or not permanent else " before it was ready"
        message = f"backend {exited}{when}" + (f": {cause}" if cause else "")
        self._report("failed", instance.pk, message=message, permanent=permanent, from_states=list(RUNNING_STATES))

    def _check_health(self, instance: Assignment, proc: BackendProcess) -> None:
        backend = get_backend(instance.backend or instance.model.backend or "llama-box")
        host = "127.0.0.1" if proc.host in ("0.0.0.0", "") else proc.host
        try:
            healthy = self.health_http.get(f"http://{host}:{proc.port}{backend.health_path}").status_code == 200
        except httpx.HTTPError:
            healthy = False
        if healthy:
            proc.health_failures = 0
            proc.healthy_once = True
            if instance.state == S.STARTING:
                unknown = (instance.computed_resource_claim or {}).get("unknown")
                self._report("running", instance.pk, message=UNKNOWN_CLAIM_MESSAGE if unknown else "")
            elif instance.state == S.UNREACHABLE:
                self._report("reachable", instance.pk)
            elif instance.restart_count and time.monotonic() - proc.started_at > settings.RESTART_RESET_AFTER:
                self._report("healthy_a_while", instance.pk)
            return
        if instance.state == S.STARTING:
            if time.monotonic() - proc.started_at > settings.BACKEND_START_TIMEOUT:
                self.stop_instance(instance.pk)
                self._report("failed", instance.pk, from_states=[S.STARTING], cause="health_failed",
                             message=f"backend did not answer {backend.health_path} within "
                                     f"{settings.BACKEND_START_TIMEOUT:.0f} s")
            return
        proc.health_failures += 1
        if proc.health_failures >= HEALTH_FAILURES_BEFORE_ERROR:
            self.stop_instance(instance.pk)
            # Its process still runs (a crash is `_on_exit`'s, with the exit code): a failure of its own kind.
            self._report("failed", instance.pk, cause="health_failed", from_states=[S.RUNNING, S.UNREACHABLE],
                         message=f"backend stopped answering {backend.health_path} "
                                 f"({HEALTH_FAILURES_BEFORE_ERROR} checks in a row); it was stopped")

    def shutdown(self) -> None:
        """End every backend and part this agent started; their instances start again when the worker returns."""
        self.stopping.set()
        self.wake.set()
        with self.lock:
            owned = list(self.processes.values())
            self.processes.clear()
            preparing = list(self.preparing)
        for proc in owned:
            processes.terminate_group(proc.pid, proc.popen)
            processes.remove_pidfile(self.data_dir, proc.instance_id)
            self._close_log(proc, proc.popen.returncode if proc.popen else None, "stopped")
        self.parts.stop_all()
        if self.worker_id is not None and (owned or preparing):
            # Running or still downloading / installing: all start again when this worker returns.
            self._report("returning", instances=[p.instance_id for p in owned] + preparing,
                         message=f"worker {self.name} stopped; the instance starts again when it returns",
                         cause="worker_stopped")
        self.link.close()
        self.health_http.close()
