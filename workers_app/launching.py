"""How the node agent prepares and starts a backend: download the model, install the backend version, wait for
the distributed parts, then launch the process. A mixin of `workers_app.agent.NodeAgent` (it uses the agent's link,
lock, processes and reports)."""

from __future__ import annotations

import logging
import secrets
import threading
import time
from pathlib import Path

from django.conf import settings

from models_app.choices import InstanceState, SourceChoices
from models_app.sources import SourceError
from models_app.sources.base import DownloadCancelled, cancellable
from workers_app import downloads, logs, processes
from workers_app.backends import get_backend
from workers_app.backends.base import Backend, BackendError, Installation, LaunchSpec, distributed_master_port
from workers_app.processes import BackendProcess
from workers_app.server_link import Assignment, ServerUnreachable

logger = logging.getLogger("workers_app.agent")
S = InstanceState
INSTALL_PROGRESS_SECONDS = 1.0
PARTS_POLL_SECONDS = 0.2
PREPARING_STATES = [S.SCHEDULED, S.DOWNLOADING, S.INITIALIZING, S.STARTING]


class Launching:
    """Prepare and start backends, each in a thread of its own."""

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
            processes.write_pidfile(self.data_dir, proc, self.name, attempt=proc.attempt)
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
        return logs.log_path(instance_id, self.data_dir)

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
        attempt = logs.begin_attempt(instance.pk, log_path, self.shipper.conn if self.shipper else None)
        if self.shipper is not None:
            self.shipper.start_at_end(instance.pk, log_path, attempt)
        popen = processes.start(cmd, env=backend.environment(spec), log_path=log_path)
        logger.info("instance %s: started %s %s, pid %s on port %s (attempt %s)", instance.name, backend.name,
                    installation.version, popen.pid, port, attempt)
        return BackendProcess(instance.pk, popen, popen.pid, port, self.ip, log_path, time.monotonic(),
                              attempt=attempt)
