"""The node agent: joins the cluster, heartbeats, launches backends and watches them.

It lives in the same process as this worker's Celery consumer (threads pool), so the launch task and
the supervisor share the Popen objects and see real exit codes.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import httpx
from django.conf import settings
from django.db import close_old_connections
from django.utils import timezone

from models_app.actions import (
    do_fail_instance,
    do_forgive_restarts,
    do_mark_running,
    do_restart_instance,
    do_set_instance_state,
)
from models_app.choices import InstanceState, SourceChoices
from models_app.models import ModelInstance
from models_app.sources import SourceError
from workers_app import downloads, inventory, logs, processes
from workers_app.backends.base import BackendError, LaunchSpec, get_backend
from workers_app.processes import BackendProcess

logger = logging.getLogger(__name__)

HEALTH_FAILURES_BEFORE_ERROR = 3
STARTING_POLL_SECONDS = 0.05  # a starting backend is polled fast: deploy-to-running latency is a product goal
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
        self._end_leftover_processes()
        loops = [(self._heartbeat_loop, "heartbeat"), (self._supervise_loop, "supervisor")]
        if self.shipper is not None:
            loops.append((self._ship_loop, "log-shipper"))
        for target, name in loops:
            thread = threading.Thread(target=target, name=f"agent-{name}", daemon=True)
            thread.start()
            self.threads.append(thread)

    def _end_leftover_processes(self) -> None:
        """Backends from a previous run of this worker: end them; their instances start again below."""
        for record in processes.recorded_processes(self.data_dir):
            if processes.is_same_process(record):
                logger.info("ending leftover backend pid %s of instance %s", record["pid"], record["instance_id"])
                processes.terminate_group(record["pid"])
            processes.remove_pidfile(self.data_dir, record["instance_id"])

    def _relaunch_own_instances(self) -> None:
        stranded = ModelInstance.objects.filter(
            worker__name=self.name,
            state__in=[InstanceState.INITIALIZING, InstanceState.DOWNLOADING, InstanceState.STARTING,
                       InstanceState.RUNNING, InstanceState.UNREACHABLE],
        )
        for instance in stranded:
            with self.lock:
                if instance.pk in self.processes:
                    continue
            do_set_instance_state(instance, InstanceState.SCHEDULED, from_states=[instance.state],
                                  message=f"worker {self.name} restarted; starting again", pid=None)
        for instance_id in ModelInstance.objects.filter(worker__name=self.name, state=InstanceState.SCHEDULED) \
                .values_list("pk", flat=True):
            self.launch(instance_id)

    def register(self) -> None:
        body = {"name": self.name, "hostname": inventory.socket.gethostname(), "ip": self.ip,
                "labels": self.labels, "status": inventory.system_status()}
        response = self.http.post(f"{self.server_url}/api/v1/workers", json=body)
        response.raise_for_status()
        self.worker_id = response.json()["id"]
        first = not self.registered.is_set()
        self.registered.set()
        logger.info("worker %s registered as id %s", self.name, self.worker_id)
        if first:
            self._relaunch_own_instances()

    def heartbeat(self) -> None:
        response = self.http.post(f"{self.server_url}/api/v1/workers/{self.worker_id}/heartbeat",
                                  json={"status": inventory.system_status()})
        if response.status_code == 404:  # deleted by an operator: join again
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
        """Start the backend for a scheduled instance; never two processes for one instance."""
        with self.lock:
            if instance_id in self.processes or self.stopping.is_set():
                return
            instance = ModelInstance.objects.select_related("model", "worker").filter(pk=instance_id).first()
            if instance is None or instance.worker is None or instance.worker.name != self.name:
                return
            if instance.model.source != SourceChoices.LOCAL_PATH:
                if do_set_instance_state(instance, InstanceState.DOWNLOADING, from_states=[InstanceState.SCHEDULED],
                                         message="downloading the model files", download_progress=0):
                    threading.Thread(target=self._download_then_start, args=(instance,), daemon=True,
                                     name=f"download-{instance.pk}").start()
                return
            if not do_set_instance_state(instance, InstanceState.STARTING, from_states=[InstanceState.SCHEDULED],
                                         message="starting the backend"):
                return
            self._start_and_record(instance)

    def _download_then_start(self, instance: ModelInstance) -> None:
        def progress(percent: float) -> None:
            ModelInstance.objects.filter(pk=instance.pk, state=InstanceState.DOWNLOADING).update(
                download_progress=round(percent, 1))

        try:
            path = downloads.download(instance.model, progress)
            with self.lock:
                if not self.stopping.is_set() and do_set_instance_state(
                        instance, InstanceState.STARTING, from_states=[InstanceState.DOWNLOADING],
                        message="starting the backend", download_progress=100, resolved_path=str(path)):
                    self._start_and_record(instance)
        except (SourceError, OSError) as exc:  # the hub's reason; retried with backoff like any error
            do_fail_instance(instance, f"download failed: {exc}", from_states=[InstanceState.DOWNLOADING])
        except Exception as exc:  # never leave an instance `downloading` for ever
            logger.exception("instance %s: download failed", instance.name)
            do_fail_instance(instance, f"download failed: {type(exc).__name__}: {exc}",
                             from_states=[InstanceState.DOWNLOADING])
        finally:
            close_old_connections()  # this thread's own connection

    def _start_and_record(self, instance: ModelInstance) -> None:
        """With the lock held and the instance `starting`: run its backend and remember the process."""
        try:
            proc = self._start_backend(instance)
        except BackendError as exc:
            do_fail_instance(instance, str(exc), from_states=[InstanceState.STARTING])
            return
        self.processes[instance.pk] = proc
        processes.write_pidfile(self.data_dir, proc, self.name)
        # Deleted meanwhile? The supervisor ends processes whose instance is gone.
        ModelInstance.objects.filter(pk=instance.pk, state=InstanceState.STARTING).update(pid=proc.pid, port=proc.port)

    def _start_backend(self, instance: ModelInstance) -> BackendProcess:
        model = instance.model
        backend = get_backend(model.backend or "llama-box")
        backend.ensure_installed(model.backend_version)
        path = backend.resolve_model_path(Path(instance.resolved_path or model.local_path))
        taken = {p.port for p in self.processes.values()}
        port = processes.free_port(self.ip, *settings.BACKEND_PORT_RANGE, taken)
        spec = LaunchSpec(model_name=model.name, model_path=path, host=self.ip, port=port,
                          categories=list(model.categories or []), gpu_indexes=list(instance.gpu_indexes or []),
                          claim=dict(instance.computed_resource_claim or {}),
                          backend_parameters=list(model.backend_parameters or []),
                          backend_version=model.backend_version, env=dict(model.env or {}))
        cmd = backend.command(spec)
        log_path = self.data_dir / "logs" / "instances" / f"{instance.pk}.log"
        if self.shipper is not None:
            self.shipper.start_at_end(instance.pk, log_path)
        popen = processes.start(cmd, env=backend.environment(spec), log_path=log_path)
        logger.info("instance %s: started pid %s on port %s", instance.name, popen.pid, port)
        return BackendProcess(instance.pk, popen, popen.pid, port, self.ip, log_path, time.monotonic())

    def stop_instance(self, instance_id: int) -> None:
        with self.lock:
            proc = self.processes.pop(instance_id, None)
        if proc is not None:
            processes.terminate_group(proc.pid, proc.popen)
            processes.remove_pidfile(self.data_dir, instance_id)
            self._ship(proc)
            if not ModelInstance.objects.filter(pk=instance_id).exists():
                logs.forget([instance_id])  # deleted: its log goes with it
            logger.info("instance %s: backend pid %s ended", instance_id, proc.pid)

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

    def _restart_due(self) -> None:
        """Errored instances of this worker whose backoff has run out start again, here."""
        due = ModelInstance.objects.filter(worker__name=self.name, state=InstanceState.ERROR,
                                           model__restart_on_error=True, next_restart_at__lte=timezone.now())
        for instance in due:
            if do_restart_instance(instance):
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
            elif instance.state in (InstanceState.STARTING, InstanceState.RUNNING):
                self._check_health(instance, proc)

    def _on_exit(self, instance: ModelInstance, proc: BackendProcess, returncode: int) -> None:
        with self.lock:
            self.processes.pop(instance.pk, None)
        processes.remove_pidfile(self.data_dir, instance.pk)
        self._ship(proc)  # the last lines usually say why it died
        backend = get_backend(instance.model.backend or "llama-box")
        cause = backend.error_from_log(processes.tail_lines(proc.log_path))
        message = f"backend {processes.describe_exit(returncode)}" + (f": {cause}" if cause else "")
        do_fail_instance(instance, message, from_states=[InstanceState.STARTING, InstanceState.RUNNING])

    def _check_health(self, instance: ModelInstance, proc: BackendProcess) -> None:
        backend = get_backend(instance.model.backend or "llama-box")
        host = "127.0.0.1" if proc.host in ("0.0.0.0", "") else proc.host
        try:
            healthy = self.health_http.get(f"http://{host}:{proc.port}{backend.health_path}").status_code == 200
        except httpx.HTTPError:
            healthy = False
        if healthy:
            proc.health_failures = 0
            proc.healthy_once = True
            if instance.state == InstanceState.STARTING:
                do_mark_running(instance)
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
                             from_states=[InstanceState.RUNNING])

    def shutdown(self) -> None:
        """End every backend this agent started; their instances start again when the worker returns."""
        self.stopping.set()
        with self.lock:
            owned = list(self.processes.values())
            self.processes.clear()
        for proc in owned:
            processes.terminate_group(proc.pid, proc.popen)
            processes.remove_pidfile(self.data_dir, proc.instance_id)
            self._ship(proc)
        try:
            close_old_connections()
            for proc in owned:
                ModelInstance.objects.filter(pk=proc.instance_id, state__in=InstanceState.on_worker()).update(
                    state=InstanceState.SCHEDULED, pid=None,
                    state_message=f"worker {self.name} stopped; the instance starts again when it returns")
        except Exception:  # the database may already be gone; the processes are what must not leak
            logger.exception("could not record the stopped instances")
        self.http.close()
        self.health_http.close()
