"""The node agent: joins the cluster, heartbeats, launches backends and watches them.

It lives in the same process as this worker's Celery consumer (threads pool), so the launch task and
the supervisor share the Popen objects and see real exit codes.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import shutil
import tempfile
import threading
import time
from pathlib import Path

import httpx
from django.conf import settings
from django.db import close_old_connections
from django.utils import timezone

from models_app.choices import InstanceState, SourceChoices
from models_app.lifecycle import (
    do_begin_download,
    do_begin_install,
    do_begin_start,
    do_fail_instance,
    do_forgive_restarts,
    do_mark_reachable,
    do_mark_running,
    do_note_alive,
    do_record_download_progress,
    do_record_downloaded,
    do_record_preparation,
    do_record_process,
    do_restart_instance,
    do_restart_on_returning_worker,
)
from models_app.models import ModelInstance
from models_app.sources import SourceError
from models_app.sources.base import DownloadCancelled, cancellable
from workers_app import downloads, inventory, logs, processes
from workers_app.backends import get_backend
from workers_app.backends.base import Backend, BackendError, Installation, LaunchSpec
from workers_app.processes import BackendProcess

logger = logging.getLogger(__name__)

HEALTH_FAILURES_BEFORE_ERROR = 3
INSTALL_PROGRESS_SECONDS = 1.0
ALIVE_NOTE_SECONDS = 30.0  # an install's progress reaches the instance at most this often
PREPARING_STATES = [InstanceState.SCHEDULED, InstanceState.DOWNLOADING, InstanceState.INITIALIZING,
                    InstanceState.STARTING]
STARTING_POLL_SECONDS = 0.05  # a starting backend is polled fast: deploy-to-running latency is a product goal
UNKNOWN_CLAIM_MESSAGE = ("resource claim unknown: the server could not read the model's metadata, so no memory "
                         "was booked for it")
_current: NodeAgent | None = None


def current_agent() -> NodeAgent:
    if _current is None:
        raise RuntimeError("no node agent runs in this process (start it with `manage.py worker`)")
    return _current


class NodeAgent:
    def __init__(self, *, name: str, server_url: str, token: str, ip: str, data_dir: Path, labels: dict | None = None):
        self.name = name
        self.server_url = server_url.rstrip("/")
        self.token = token
        self.ip = ip
        self.data_dir = data_dir
        self.labels = labels or {}
        self.worker_id: int | None = None
        self.processes: dict[int, BackendProcess] = {}
        self.preparing: set[int] = set()  # instances downloading, installing or about to start, in their own thread
        self.noted_alive_at = 0.0
        self.node = inventory.node_info()
        # Backends' TMPDIRs, short (vLLM's IPC socket paths must fit in 107 bytes), one folder per data dir.
        self.tmp_root = Path(tempfile.gettempdir()) / f"aimind-{hashlib.sha1(str(data_dir).encode()).hexdigest()[:8]}"
        self.lock = threading.RLock()
        self.stopping = threading.Event()
        self.registered = threading.Event()
        self.http = httpx.Client(timeout=5.0, headers={"Authorization": f"Bearer {token}"})
        self.health_http = httpx.Client(timeout=1.0)
        self.threads: list[threading.Thread] = []
        redis_conn = logs.client()
        self.shipper = logs.LogShipper(redis_conn) if redis_conn is not None else None

    def start(self) -> None:
        global _current
        _current = self
        self._adopt_leftover_processes()
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
        records = processes.recorded_processes(self.data_dir)
        rows = {i.pk: i for i in ModelInstance.objects.select_related("worker").filter(
            pk__in=[r.get("instance_id") for r in records])}
        for record in records:
            instance = rows.get(record.get("instance_id"))
            adoptable = (instance is not None and instance.worker is not None and instance.worker.name == self.name
                         and record.get("worker") == self.name and instance.pid == record.get("pid")
                         and instance.state in (InstanceState.STARTING, InstanceState.RUNNING,
                                                InstanceState.UNREACHABLE))
            if processes.is_same_process(record) and adoptable:
                log_path = self.data_dir / "logs" / "instances" / f"{instance.pk}.log"
                proc = BackendProcess(instance.pk, None, record["pid"], record["port"], self.ip, log_path,
                                      time.monotonic(), healthy_once=instance.state != InstanceState.STARTING,
                                      adopted=True)
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
        stranded = ModelInstance.objects.filter(
            worker__name=self.name,
            state__in=[InstanceState.INITIALIZING, InstanceState.DOWNLOADING, InstanceState.STARTING,
                       InstanceState.RUNNING, InstanceState.UNREACHABLE],
        ).values_list("pk", flat=True)
        with self.lock:
            mine = set(self.processes) | self.preparing
        do_restart_on_returning_worker([pk for pk in stranded if pk not in mine], self.name,
                                       f"worker {self.name} restarted; starting again", cause="worker_restarted")
        for instance_id in ModelInstance.objects.filter(worker__name=self.name, state=InstanceState.SCHEDULED) \
                .values_list("pk", flat=True):
            self.launch(instance_id)

    @property
    def credential_path(self) -> Path:
        return self.data_dir / "worker-credential"

    def _credential_headers(self) -> dict[str, str]:
        try:
            return {"X-Worker-Credential": self.credential_path.read_text().strip()}
        except OSError:
            return {}

    def register(self) -> None:
        body = {"name": self.name, "hostname": inventory.socket.gethostname(), "ip": self.ip,
                "labels": self.labels, "status": inventory.system_status()}
        response = self.http.post(f"{self.server_url}/api/v1/workers", json=body, headers=self._credential_headers())
        if response.status_code == 409:
            logger.error("worker name %s is taken: %s", self.name, response.json().get("detail"))
        response.raise_for_status()
        answer = response.json()
        if answer.get("credential"):  # ours from now on: it proves this worker is the one that joined
            self.credential_path.parent.mkdir(parents=True, exist_ok=True)
            self.credential_path.touch(mode=0o600)
            self.credential_path.chmod(0o600)
            self.credential_path.write_text(answer["credential"])
        self.worker_id = answer["id"]
        first = not self.registered.is_set()
        self.registered.set()
        logger.info("worker %s registered as id %s", self.name, self.worker_id)
        if first:
            self._relaunch_own_instances()

    def heartbeat(self) -> None:
        response = self.http.post(f"{self.server_url}/api/v1/workers/{self.worker_id}/heartbeat",
                                  json={"status": inventory.system_status()}, headers=self._credential_headers())
        if response.status_code in (403, 404):  # deleted by an operator, or our credential is not known: join again
            self.register()
            return
        response.raise_for_status()

    def _heartbeat_loop(self) -> None:
        delay = 0.2
        while not self.stopping.is_set():
            try:
                if self.worker_id is None:
                    self.register()
                else:
                    self.heartbeat()
                delay = settings.HEARTBEAT_INTERVAL
            except (httpx.HTTPError, KeyError, ValueError) as exc:
                logger.info("server %s not answering yet (%s); retrying", self.server_url, exc)
                delay = min(max(delay * 2, 0.2), settings.HEARTBEAT_INTERVAL)
            finally:
                close_old_connections()
            self.stopping.wait(delay)

    def launch(self, instance_id: int) -> None:
        """Prepare and start the backend of a scheduled instance, in a thread of its own: a download or an install
        takes minutes, and the agent keeps supervising its other backends meanwhile. Never two for one instance."""
        with self.lock:
            if instance_id in self.processes or instance_id in self.preparing or self.stopping.is_set():
                return
            instance = ModelInstance.objects.select_related("model", "worker").filter(pk=instance_id).first()
            if instance is None or instance.worker is None or instance.worker.name != self.name \
                    or instance.state != InstanceState.SCHEDULED:
                return
            self.preparing.add(instance_id)
        threading.Thread(target=self._prepare_and_start, args=(instance,), daemon=True,
                         name=f"prepare-{instance_id}").start()

    def _prepare_and_start(self, instance: ModelInstance) -> None:
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
            close_old_connections()  # this thread's own connection

    def _failed_to_start(self, instance: ModelInstance, message: str, permanent: bool) -> None:
        with self.lock:  # first: a restart that is due at once must find the instance free to launch
            self.preparing.discard(instance.pk)
            started = instance.pk in self.processes
        if started:
            self.stop_instance(instance.pk)
        do_fail_instance(instance, message, from_states=PREPARING_STATES, permanent=permanent)

    def _prepare_and_start_unguarded(self, instance: ModelInstance) -> None:
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
        with self.lock:
            instance.refresh_from_db()  # the placement as it is now, not as it was before a download or install
            key = secrets.token_urlsafe(24) if backend.api_key_env else ""
            if self.stopping.is_set() or not do_begin_start(instance, self.name, backend=backend.name,
                                                            backend_version=installation.version,
                                                            backend_api_key=key):
                return
            proc = self._start_backend(instance, backend, installation, model_path)
            self.processes[instance.pk] = proc
            processes.write_pidfile(self.data_dir, proc, self.name)
            # Under the lock: the supervisor must not see it healthy (and running) before it has its port.
            do_record_process(instance, proc.pid, proc.port)

    def _download(self, instance: ModelInstance) -> Path | None:
        if not do_begin_download(instance, self.name):
            return None
        gone = threading.Event()  # the instance was deleted (or moved on): the download stops

        def progress(percent: float) -> None:
            if not do_record_download_progress(instance, percent):
                gone.set()

        try:
            with cancellable(lambda: gone.is_set() or self.stopping.is_set()):
                path = downloads.download(instance.model, progress)
        except DownloadCancelled:
            logger.info("instance %s: download stopped, the instance is gone", instance.name)
            return None
        except (SourceError, OSError) as exc:  # the hub's reason; retried with backoff like any error
            raise BackendError(f"download failed: {exc}") from exc
        return path if do_record_downloaded(instance, str(path)) else None

    def _installation(self, instance: ModelInstance, backend: Backend, version: str) -> Installation | None:
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
        if not do_begin_install(instance, self.name, f"{what}: starting"):
            return None
        last = [0.0]

        def progress(line: str) -> None:
            now = time.monotonic()
            if now - last[0] >= INSTALL_PROGRESS_SECONDS:
                last[0] = now
                do_record_preparation(instance, line if line.startswith("installing") else f"{what}: {line}")

        logger.info("instance %s: %s", instance.name, what)
        return backend.install(version, variant, progress)

    def _start_backend(self, instance: ModelInstance, backend: Backend, installation: Installation,
                       model_path: Path) -> BackendProcess:
        model = instance.model
        taken = {p.port for p in self.processes.values()}
        port = processes.free_port(self.ip, *settings.BACKEND_PORT_RANGE, taken)
        work_dir = self.data_dir / "work" / str(instance.pk)
        work_dir.mkdir(parents=True, exist_ok=True)
        tmp_dir = self.tmp_root / str(instance.pk)
        spec = LaunchSpec(model_name=model.name, model_path=model_path, host=self.ip, port=port,
                          categories=list(model.categories or []), gpu_indexes=list(instance.gpu_indexes or []),
                          claim=dict(instance.computed_resource_claim or {}),
                          backend_parameters=list(model.backend_parameters or []), env=dict(model.env or {}),
                          installation=installation, work_dir=work_dir, tmp_dir=tmp_dir,
                          api_key=instance.backend_api_key)
        cmd = backend.command(spec)
        log_path = self.data_dir / "logs" / "instances" / f"{instance.pk}.log"
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
        if not ModelInstance.objects.filter(pk=instance_id).exists():  # deleted: its log and files go with it
            logs.forget([instance_id])
            shutil.rmtree(self.data_dir / "work" / str(instance_id), ignore_errors=True)
            shutil.rmtree(self.tmp_root / str(instance_id), ignore_errors=True)

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

    def _next_check_in(self) -> float:
        with self.lock:
            starting = any(not p.healthy_once for p in self.processes.values())
        interval = settings.HEALTH_CHECK_INTERVAL
        return min(STARTING_POLL_SECONDS, interval) if starting else interval

    def _supervise_loop(self) -> None:
        while not self.stopping.wait(self._next_check_in()):
            try:
                self.supervise_once()
            except Exception:  # the supervisor must outlive any single bad check
                logger.exception("supervisor check failed")
            finally:
                close_old_connections()

    def supervise_once(self) -> None:
        self._check_processes()
        self._restart_due()
        self._note_preparing_alive()

    def _note_preparing_alive(self) -> None:
        """Downloads and installs in progress are alive, however quiet: the stuck sweep must leave them alone."""
        now = time.monotonic()
        if now - self.noted_alive_at < ALIVE_NOTE_SECONDS:
            return
        self.noted_alive_at = now
        with self.lock:
            preparing = list(self.preparing)
        do_note_alive(preparing)

    def _restart_due(self) -> None:
        """Errored instances of this worker whose backoff has run out start again, here."""
        due = ModelInstance.objects.filter(worker__name=self.name, state=InstanceState.ERROR,
                                           model__restart_on_error=True, next_restart_at__lte=timezone.now())
        for instance in due:
            with self.lock:
                busy = instance.pk in self.processes or instance.pk in self.preparing
            if not busy and do_restart_instance(instance):
                self.launch(instance.pk)

    def _check_processes(self) -> None:
        with self.lock:
            current = dict(self.processes)
        if not current:
            return
        rows = {i.pk: i for i in ModelInstance.objects.select_related("model", "worker").filter(pk__in=list(current))}
        for instance_id, proc in current.items():
            instance = rows.get(instance_id)
            if instance is None or instance.worker is None or instance.worker.name != self.name:
                self.stop_instance(instance_id)  # deleted or moved: its process must not outlive it
                continue
            returncode = proc.poll()
            if returncode is not None:
                self._on_exit(instance, proc, returncode)
            elif instance.state in (InstanceState.STARTING, InstanceState.RUNNING, InstanceState.UNREACHABLE):
                self._check_health(instance, proc)

    def _on_exit(self, instance: ModelInstance, proc: BackendProcess, returncode: int) -> None:
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
        do_fail_instance(instance, message, permanent=permanent, from_states=[
            InstanceState.STARTING, InstanceState.RUNNING, InstanceState.UNREACHABLE])

    def _check_health(self, instance: ModelInstance, proc: BackendProcess) -> None:
        backend = get_backend(instance.backend or instance.model.backend or "llama-box")
        host = "127.0.0.1" if proc.host in ("0.0.0.0", "") else proc.host
        try:
            healthy = self.health_http.get(f"http://{host}:{proc.port}{backend.health_path}").status_code == 200
        except httpx.HTTPError:
            healthy = False
        if healthy:
            proc.health_failures = 0
            proc.healthy_once = True
            if instance.state == InstanceState.STARTING:
                unknown = (instance.computed_resource_claim or {}).get("unknown")
                do_mark_running(instance, UNKNOWN_CLAIM_MESSAGE if unknown else "")
            elif instance.state == InstanceState.UNREACHABLE:
                do_mark_reachable(instance, self.name)
            elif instance.restart_count:
                do_forgive_restarts(instance)
            return
        if instance.state == InstanceState.STARTING:
            if time.monotonic() - proc.started_at > settings.BACKEND_START_TIMEOUT:
                self.stop_instance(instance.pk)
                do_fail_instance(instance, f"backend did not answer {backend.health_path} within "
                                           f"{settings.BACKEND_START_TIMEOUT:.0f} s",
                                 from_states=[InstanceState.STARTING])
            return
        proc.health_failures += 1
        if proc.health_failures >= HEALTH_FAILURES_BEFORE_ERROR:
            self.stop_instance(instance.pk)
            do_fail_instance(instance, f"backend stopped answering {backend.health_path}",
                             from_states=[InstanceState.RUNNING, InstanceState.UNREACHABLE])

    def shutdown(self) -> None:
        """End every backend this agent started; their instances start again when the worker returns."""
        self.stopping.set()
        with self.lock:
            owned = list(self.processes.values())
            self.processes.clear()
            preparing = list(self.preparing)
        for proc in owned:
            processes.terminate_group(proc.pid, proc.popen)
            processes.remove_pidfile(self.data_dir, proc.instance_id)
            self._ship(proc)
        try:
            close_old_connections()
            # Running or still downloading / installing: all start again when this worker returns.
            do_restart_on_returning_worker([p.instance_id for p in owned] + preparing, self.name,
                                           f"worker {self.name} stopped; the instance starts again when it returns",
                                           cause="worker_stopped")
        except Exception:  # the database may already be gone; the processes are what must not leak
            logger.exception("could not record the stopped instances")
        self.http.close()
        self.health_http.close()
