"""The node agent: joins the cluster, heartbeats, launches backends and watches them.

It lives in the same process as this worker's Celery consumer (threads pool), so the launch task and the supervisor
share the Popen objects and see real exit codes. It holds no database connection: it reads what it is to run from
the server's API (`ServerLink`) and reports each thing that happens there; the server applies the lifecycle.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path

import httpx
from django.conf import settings

from models_app.choices import InstanceState, SourceChoices
from models_app.sources import SourceError
from models_app.sources.base import DownloadCancelled, cancellable
from workers_app import downloads, inventory, logs, measure, processes
from workers_app.backends import get_backend
from workers_app.backends.base import Backend, BackendError, Installation, LaunchSpec, distributed_master_port
from workers_app.parts import PartRunner
from workers_app.processes import BackendProcess
from workers_app.server_link import Assignment, NameTaken, ServerLink, ServerUnreachable

logger = logging.getLogger(__name__)
S = InstanceState

HEALTH_FAILURES_BEFORE_ERROR = 3
INSTALL_PROGRESS_SECONDS = 1.0
ALIVE_NOTE_SECONDS = 30.0  # an install's progress reaches the instance at most this often
PREPARING_STATES = [S.SCHEDULED, S.DOWNLOADING, S.INITIALIZING, S.STARTING]
RUNNING_STATES = (S.STARTING, S.RUNNING, S.UNREACHABLE)  # a backend process belongs to the instance
STARTING_POLL_SECONDS = 0.05  # a starting backend is polled fast: deploy-to-running latency is a product goal
PARTS_POLL_SECONDS = 0.2
UNKNOWN_CLAIM_MESSAGE = ("resource claim unknown: the server could not read the model's metadata, so no memory "
                         "was booked for it")
_current: NodeAgent | None = None


def current_agent() -> NodeAgent:
    if _current is None:
        raise RuntimeError("no node agent runs in this process (start it with `manage.py worker`)")
    return _current


class NodeAgent:
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
                "status": inventory.system_status()}
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
                                      time.monotonic(), healthy_once=instance.state != S.STARTING, adopted=True)
                self.processes[instance.pk] = proc
                if self.shipper is not None:
                    self.shipper.start_at_end(instance.pk, log_path)
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

    def heartbeat(self) -> None:
        with self.lock:
            running = {pk: proc.pid for pk, proc in self.processes.items()}
        try:
            measured = measure.measure(running)
        except Exception:  # a measurement must never cost the heartbeat
            logger.exception("could not measure the backends' memory")
            measured = {}
        if not self.link.heartbeat(inventory.system_status(), measured):  # deleted, or not ours: join again
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

    # Launching.

    def launch(self, instance_id: int) -> None:
        """Prepare and start the backend of a scheduled instance, in a thread of its own: a download or an install
        takes minutes, and the agent keeps supervising its other backends meanwhile. Never two for one instance."""
        with self.lock:
            if instance_id in self.processes or instance_id in self.preparing or self.stopping.is_set():
                return
            self.preparing.add(instance_id)
        try:
            instance = self.link.assignment(instance_id)
        except ServerUnreachable as exc:
            logger.warning("instance %s: cannot read it from the server (%s); trying again later", instance_id, exc)
            instance = None
        if instance is None or instance.role != "main" or instance.state != S.SCHEDULED:
            with self.lock:
                self.preparing.discard(instance_id)
            if instance is not None:
                self.parts.wake()  # a part of it may be ours
            return
        threading.Thread(target=self._prepare_and_start, args=(instance,), daemon=True,
                         name=f"prepare-{instance_id}").start()

    def _prepare_and_start(self, instance: Assignment) -> None:
        try:
            self._prepare_and_start_unguarded(instance)
        except BackendError as exc:
            self._failed_to_start(instance, str(exc), exc.permanent)
        except Exception as exc:  # never leave an instance preparing for ever
            logger.exception("instance %s: could not be started", instance.name)
            self._failed_to_start(instance, f"{type(exc).__name__}: {exc}", permanent=False)
        finally:
            with self.lock:
                self.preparing.discard(instance.pk)

    def _failed_to_start(self, instance: Assignment, message: str, permanent: bool) -> None:
        with self.lock:
            started = instance.pk in self.processes
        if started:
            self.stop_instance(instance.pk)
        self._report("failed", instance.pk, message=message, permanent=permanent, from_states=PREPARING_STATES)
        with self.lock:  # only now: the supervisor must not call it "not running" before the real cause is told
            self.preparing.discard(instance.pk)
        self.wake.set()  # a restart due at once starts now, not at the next check

    def _prepare_and_start_unguarded(self, instance: Assignment) -> None:
        model = instance.model
        backend = get_backend(instance.backend or model.backend or "llama-box")
        version = instance.backend_version or model.backend_version or backend.default_version
        if model.source == SourceChoices.LOCAL_PATH:
            model_path = backend.resolve_model_path(Path(model.local_path))  # before a long install, not after
        else:
            downloaded = self._download(instance)
            if downloaded is None:
                return
            model_path = backend.resolve_model_path(downloaded)
        installation = self._installation(instance, backend, version)
        if installation is None:
            return
        rpc_servers = self._wait_for_parts(instance) if instance.distributed_servers else []
        if rpc_servers is None:
            return
        with self.lock:
            key = secrets.token_urlsafe(24) if backend.api_key_env else ""
            if self.stopping.is_set() or not self._report("starting", instance.pk, backend=backend.name,
                                                          backend_version=installation.version,
                                                          backend_api_key=key):
                return
            current = self.view.get(instance.pk) or instance  # the placement as it is now
            proc = self._start_backend(current, backend, installation, model_path, key, rpc_servers)
            self.processes[instance.pk] = proc
            processes.write_pidfile(self.data_dir, proc, self.name)
            # Under the lock: the supervisor must not see it healthy (and running) before it has its port.
            self._report("process", instance.pk, pid=proc.pid, port=proc.port)

    def _download(self, instance: Assignment) -> Path | None:
        if not self._report("download_started", instance.pk):
            return None
        gone = threading.Event()  # the instance was deleted (or moved on): the download stops

        def progress(percent: float) -> None:
            if not self._report("download_progress", instance.pk, percent=round(percent, 1)):
                gone.set()

        try:
            with cancellable(lambda: gone.is_set() or self.stopping.is_set()):
                path = downloads.download(instance.model, progress)
        except DownloadCancelled:
            logger.info("instance %s: download stopped, the instance is gone", instance.name)
            return None
        except (SourceError, OSError) as exc:  # the hub's reason; retried with backoff like any error
            raise BackendError(f"download failed: {exc}") from exc
        return path if self._report("downloaded", instance.pk, path=str(path)) else None

    def _installation(self, instance: Assignment, backend: Backend, version: str) -> Installation | None:
        """The backend version this instance needs, installed first if this node does not have it (the instance
        shows `initializing` with the installer's progress meanwhile)."""
        variant = backend.variant(self.node)
        found = backend.find(version, variant)
        if found is not None:
            return found
        ok, reason = backend.installable(self.node)
        if not ok:
            raise BackendError(f"{backend.name} cannot run on worker {self.name}: {reason}", permanent=True)
        what = f"installing {backend.name} {version}" + (f" ({variant})" if variant else "")
        if not self._report("install_started", instance.pk, message=f"{what}: starting"):
            return None
        last = [0.0]

        def progress(line: str) -> None:
            now = time.monotonic()
            if now - last[0] >= INSTALL_PROGRESS_SECONDS:
                last[0] = now
                self._report("preparing", instance.pk,
                             message=line if line.startswith("installing") else f"{what}: {line}")

        logger.info("instance %s: %s", instance.name, what)
        return backend.install(version, variant, progress)

    def _wait_for_parts(self, instance: Assignment) -> list[str] | None:
        """A distributed instance starts only when every part's RPC server answers: their addresses, in order.
        None when the instance moved on meanwhile; a BackendError when the parts do not come in time."""
        deadline = time.monotonic() + settings.BACKEND_START_TIMEOUT
        self._report("preparing", instance.pk, message=f"waiting for {len(instance.distributed_servers)} RPC "
                                                       f"server(s) on other workers")
        while not self.stopping.is_set():
            try:
                current = self.link.assignment(instance.pk)
            except ServerUnreachable:
                current = instance
            if current is None or current.role != "main" or current.state not in PREPARING_STATES:
                return None
            parts = current.distributed_servers
            if parts and all(p.get("state") == "ready" and p.get("port") for p in parts):
                return [f"{p['host']}:{p['port']}" for p in parts]
            if time.monotonic() > deadline:
                waiting = ", ".join(f"{p.get('worker_name')}" for p in parts if p.get("state") != "ready")
                raise BackendError(f"RPC servers on {waiting} did not start within "
                                   f"{settings.BACKEND_START_TIMEOUT:.0f} s")
            self.stopping.wait(PARTS_POLL_SECONDS)
        return None

    def _log_path(self, instance_id: int) -> Path:
        return self.data_dir / "logs" / "instances" / f"{instance_id}.log"

    def _start_backend(self, instance: Assignment, backend: Backend, installation: Installation, model_path: Path,
                       api_key: str, rpc_servers: list[str]) -> BackendProcess:
        model = instance.model
        taken = {p.port for p in self.processes.values()} | self.parts.ports()
        port = processes.free_port(self.ip, *settings.BACKEND_PORT_RANGE, taken)
        work_dir = self.data_dir / "work" / str(instance.pk)
        work_dir.mkdir(parents=True, exist_ok=True)
        tmp_dir = self.tmp_root / str(instance.pk)
        spec = LaunchSpec(model_name=model.name, model_path=model_path, host=self.ip, port=port,
                          categories=list(model.categories or []), gpu_indexes=list(instance.gpu_indexes or []),
                          claim=dict(instance.computed_resource_claim or {}),
                          backend_parameters=list(model.backend_parameters or []), env=dict(model.env or {}),
                          installation=installation, work_dir=work_dir, tmp_dir=tmp_dir, api_key=api_key,
                          rpc_servers=rpc_servers if backend.part_listens else [],
                          master_port=distributed_master_port(
                              instance.pk, int(instance.distributed_servers[0].get("attempt") or 0))
                          if instance.distributed_servers else 0)
        cmd = backend.command(spec)
        log_path = self._log_path(instance.pk)
        if self.shipper is not None:
            self.shipper.start_at_end(instance.pk, log_path)
        popen = processes.start(cmd, env=backend.environment(spec), log_path=log_path)
        logger.info("instance %s: started %s %s, pid %s on port %s", instance.name, backend.name,
                    installation.version, popen.pid, port)
        return BackendProcess(instance.pk, popen, popen.pid, port, self.ip, log_path, time.monotonic())

    def stop_instance(self, instance_id: int) -> None:
        with self.lock:
            proc = self.processes.pop(instance_id, None)
        if proc is not None:
            processes.terminate_group(proc.pid, proc.popen)
            processes.remove_pidfile(self.data_dir, instance_id)
            self._ship(proc)
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
        self._ship(proc)  # the last lines usually say why it died
        backend = get_backend(instance.backend or instance.model.backend or "llama-box")
        lines = processes.tail_lines(proc.log_path)
        cause = backend.error_from_log(lines)
        permanent = backend.exit_is_permanent(returncode, lines, proc.healthy_once) and not proc.adopted
        when = "" if proc.healthy_once or not permanent else " before it was ready"
        # An adopted process is not this agent's child: how it ended is not known, only that it did.
        exited = "exited" if proc.adopted else processes.describe_exit(returncode)
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
                self._report("failed", instance.pk, from_states=[S.STARTING],
                             message=f"backend did not answer {backend.health_path} within "
                                     f"{settings.BACKEND_START_TIMEOUT:.0f} s")
            return
        proc.health_failures += 1
        if proc.health_failures >= HEALTH_FAILURES_BEFORE_ERROR:
            self.stop_instance(instance.pk)
            self._report("failed", instance.pk, message=f"backend stopped answering {backend.health_path}",
                         from_states=[S.RUNNING, S.UNREACHABLE])

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
            self._ship(proc)
        self.parts.stop_all()
        if self.worker_id is not None and (owned or preparing):
            # Running or still downloading / installing: all start again when this worker returns.
            self._report("returning", instances=[p.instance_id for p in owned] + preparing,
                         message=f"worker {self.name} stopped; the instance starts again when it returns",
                         cause="worker_stopped")
        self.link.close()
        self.health_http.close()
