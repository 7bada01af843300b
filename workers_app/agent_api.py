"""The node agent's own door: what a worker is to run (its assignments) and what happened to it (its reports).

Worker nodes hold no database credentials: the agent learns and tells everything through these two routes (and
takes its launch and stop requests from its Celery queue). A worker authenticates with the cluster token and its
own credential, and sees and reports only the instances placed on it, or whose RPC servers it runs.
"""

from __future__ import annotations

from django.db import transaction
from django.shortcuts import get_object_or_404
from django.utils import timezone
from drf_spectacular.utils import extend_schema, inline_serializer
from rest_framework import permissions, serializers, status
from rest_framework.response import Response
from rest_framework.views import APIView

from gateway_app.authentication import bearer_token
from models_app import lifecycle
from models_app.choices import ErrorKind, InstanceState
from models_app.models import ModelInstance
from workers_app.actions import holds_credential
from workers_app.choices import WorkerState
from workers_app.cluster import CREDENTIAL_HEADER, is_cluster_token
from workers_app.models import Worker

MODEL_FIELDS = ("id", "name", "source", "huggingface_repo_id", "huggingface_filename", "model_scope_model_id",
                "model_scope_file_path", "local_path", "categories", "backend", "backend_version",
                "backend_parameters", "env", "restart_on_error")
S = InstanceState


class IsThisWorker(permissions.BasePermission):
    """The cluster token and the credential this worker was given when it joined; nothing else opens its door."""

    message = (f"a worker's own routes need the cluster token (Authorization: Bearer) and its credential "
               f"({CREDENTIAL_HEADER})")

    def has_permission(self, request, view) -> bool:
        if not is_cluster_token(bearer_token(request.headers.get("Authorization"))):
            return False
        worker = get_object_or_404(Worker, pk=view.kwargs["pk"])  # 404: deleted; the agent joins again
        if not holds_credential(worker, request.headers.get(CREDENTIAL_HEADER)):
            return False
        view.worker = worker
        return True


class WorkerOnlyView(APIView):
    authentication_classes = []  # the cluster token and the worker's credential, checked by IsThisWorker
    permission_classes = [IsThisWorker]
    worker: Worker


def assignment(instance: ModelInstance, worker: Worker) -> dict:
    """One instance as its agent needs it: where and how to run it, and in which state the server holds it."""
    model = instance.model
    main = instance.worker_id == worker.pk
    due = (instance.state == S.ERROR and instance.error_kind != ErrorKind.PERMANENT and model.restart_on_error
           and instance.next_restart_at is not None and instance.next_restart_at <= timezone.now())
    return {
        "id": instance.pk, "name": instance.name, "state": instance.state, "state_message": instance.state_message,
        "role": "main" if main else "subordinate", "worker_name": instance.worker.name if instance.worker else "",
        "main_host": instance.worker.ip if instance.worker else "",
        "pid": instance.pid, "port": instance.port, "gpu_indexes": list(instance.gpu_indexes or []),
        "computed_resource_claim": dict(instance.computed_resource_claim or {}),
        "distributed_servers": list(instance.distributed_servers or []),
        "backend": instance.backend, "backend_version": instance.backend_version,
        "backend_api_key": instance.backend_api_key if main else "",
        "restart_count": instance.restart_count, "restart_due": due, "resolved_path": instance.resolved_path,
        "model": {name: getattr(model, name) for name in MODEL_FIELDS},
    }


def assignments_of(worker: Worker, instance_ids: list[int] | None = None) -> list[dict]:
    """Every instance placed on the worker, and every instance with a part on it (distributed inference)."""
    query = ModelInstance.objects.select_related("model", "worker").order_by("id")
    if instance_ids is not None:
        query = query.filter(pk__in=instance_ids)
    mine = list(query.filter(worker=worker))
    parts = [i for i in query.exclude(worker=worker).exclude(distributed_servers=[])
             if any(p.get("worker_id") == worker.pk for p in i.distributed_servers or [])]
    return [assignment(i, worker) for i in mine + parts]


class AssignmentsView(WorkerOnlyView):
    @extend_schema(responses={200: inline_serializer("Assignments", fields={
        "instances": serializers.ListField(child=serializers.DictField())})})
    def get(self, request, pk: int):
        """What this worker is to run, as the server holds it now (`?instance=ID` for one)."""
        one = request.query_params.get("instance")
        ids = [int(one)] if one and one.isdigit() else None
        return Response({"instances": assignments_of(self.worker, ids)})


class ReportSerializer(serializers.Serializer):
    event = serializers.ChoiceField(choices=[
        "download_started", "download_progress", "downloaded", "install_started", "preparing", "starting", "process",
        "running", "reachable", "healthy_a_while", "failed", "restart", "alive", "returning", "part_ready",
        "part_failed"])
    instance = serializers.IntegerField(required=False, min_value=1)
    instances = serializers.ListField(child=serializers.IntegerField(min_value=1), required=False, max_length=4096)
    message = serializers.CharField(required=False, allow_blank=True, default="", max_length=8000)
    percent = serializers.FloatField(required=False, min_value=0, max_value=100, default=0)
    path = serializers.CharField(required=False, allow_blank=True, default="", max_length=4096)
    permanent = serializers.BooleanField(required=False, default=False)
    from_states = serializers.ListField(child=serializers.ChoiceField(choices=S.choices), required=False,
                                        max_length=16)
    cause = serializers.CharField(required=False, default="", max_length=64, help_text=(
        "returning: why (default worker_returned); failed: failed (default) or health_failed (the backend runs but "
        "does not answer its health check)"))
    backend = serializers.CharField(required=False, allow_blank=True, default="", max_length=32)
    backend_version = serializers.CharField(required=False, allow_blank=True, default="", max_length=64)
    backend_api_key = serializers.CharField(required=False, allow_blank=True, default="", max_length=64)
    pid = serializers.IntegerField(required=False, min_value=1, max_value=2**31)
    port = serializers.IntegerField(required=False, min_value=1, max_value=65535)
    host = serializers.CharField(required=False, allow_blank=True, default="", max_length=64)
    index = serializers.IntegerField(required=False, min_value=0, max_value=4096)
    attempt = serializers.IntegerField(required=False, min_value=0, default=0)

    BULK = ("alive", "returning")
    FAILURE_CAUSES = ("failed", "health_failed")

    def validate(self, data):
        if data["event"] in self.BULK:
            data.setdefault("instances", [])
        elif "instance" not in data:
            raise serializers.ValidationError({"instance": f"{data['event']} needs the instance id"})
        if data["event"] in ("part_ready", "part_failed") and "index" not in data:
            raise serializers.ValidationError({"index": f"{data['event']} needs the part's index"})
        if data["event"] == "part_ready" and not ("port" in data and "pid" in data and data["host"]):
            raise serializers.ValidationError({"port": "part_ready needs host, port and pid"})
        if data["event"] == "process" and not ("port" in data and "pid" in data):
            raise serializers.ValidationError({"port": "process needs port and pid"})
        if data["event"] == "failed" and data["cause"] not in ("", *self.FAILURE_CAUSES):
            raise serializers.ValidationError({"cause": f"a failure's cause is one of "
                                                        f"{', '.join(self.FAILURE_CAUSES)}"})
        return data


def _participants_ready(instance: ModelInstance) -> bool:
    ids = {p.get("worker_id") for p in instance.distributed_servers or []}
    return not ids or Worker.objects.filter(pk__in=ids, state=WorkerState.READY).count() == len(ids)


def apply_report(worker: Worker, data: dict) -> tuple[bool, int | None]:
    """Apply one report of `worker`'s agent. Returns (applied, the instance it concerned)."""
    event = data["event"]
    name = worker.name
    if event == "alive":
        lifecycle.do_note_alive(ModelInstance.objects.filter(pk__in=data["instances"], worker=worker)
                                .values_list("pk", flat=True))
        return True, None
    if event == "returning":
        return bool(lifecycle.do_restart_on_returning_worker(data["instances"], name, data["message"],
                                                             cause=data["cause"] or "worker_returned")), None
    instance = ModelInstance.objects.select_related("model").filter(pk=data["instance"]).first()
    if instance is None:
        return False, None
    if event in ("part_ready", "part_failed"):
        parts = instance.distributed_servers or []
        index = data["index"]
        if index >= len(parts) or parts[index].get("worker_id") != worker.pk:
            return False, instance.pk
        if event == "part_failed":
            if int(parts[index].get("attempt") or 0) != data["attempt"]:
                return False, instance.pk  # a part of an earlier attempt: that attempt is over already
            return lifecycle.do_fail_part(instance, index, data["message"]), instance.pk
        return lifecycle.do_record_part_ready(instance.pk, index, worker.pk, data["attempt"], host=data["host"],
                                              port=data["port"], pid=data["pid"]), instance.pk
    if instance.worker_id != worker.pk:
        return False, instance.pk  # moved elsewhere: what this worker says about it no longer counts
    if event == "download_started":
        return lifecycle.do_begin_download(instance, name), instance.pk
    if event == "download_progress":
        return lifecycle.do_record_download_progress(instance, data["percent"]), instance.pk
    if event == "downloaded":
        return lifecycle.do_record_downloaded(instance, data["path"]), instance.pk
    if event == "install_started":
        return lifecycle.do_begin_install(instance, name, data["message"]), instance.pk
    if event == "preparing":
        lifecycle.do_record_preparation(instance, data["message"])
        return True, instance.pk
    if event == "starting":
        return lifecycle.do_begin_start(instance, name, backend=data["backend"],
                                        backend_version=data["backend_version"],
                                        backend_api_key=data["backend_api_key"]), instance.pk
    if event == "process":
        lifecycle.do_record_process(instance, data["pid"], data["port"])
        return True, instance.pk
    if event == "running":
        return lifecycle.do_mark_running(instance, data["message"]), instance.pk
    if event == "reachable":
        return lifecycle.do_mark_reachable(instance, name), instance.pk
    if event == "healthy_a_while":
        return lifecycle.do_forgive_restarts(instance), instance.pk
    if event == "failed":
        states = data.get("from_states") or [S.SCHEDULED, S.DOWNLOADING, S.INITIALIZING, S.STARTING, S.RUNNING,
                                             S.UNREACHABLE]
        return lifecycle.do_fail_instance(instance, data["message"], from_states=states, permanent=data["permanent"],
                                          cause=data["cause"] or "failed"), instance.pk
    # restart: due now; a distributed one only while every worker of its parts is ready, else placed again
    if not _participants_ready(instance):
        lifecycle.do_unplace([instance.pk], "a worker of its RPC servers is not ready; placing the instance again",
                             cause="moved")
        return False, instance.pk
    return lifecycle.do_restart_instance(instance), instance.pk


def nudge_parts(instance_id: int | None) -> None:
    """After a failure or restart of a distributed instance, its workers look at it now, not at their next check:
    the parts of the old attempt end, the new attempt's start, and the main sees a failed part."""
    instance = ModelInstance.objects.select_related("worker").filter(pk=instance_id).first()
    if instance is None or not instance.distributed_servers:
        return
    queues = {f"worker.{p.get('worker_name')}" for p in instance.distributed_servers}
    if instance.worker is not None:
        queues.add(instance.worker.queue)

    def send() -> None:
        from workers_app.tasks import sync_instances

        for queue in queues:
            sync_instances.apply_async(queue=queue)

    transaction.on_commit(send)


class ReportView(WorkerOnlyView):
    @extend_schema(request=ReportSerializer, responses={200: inline_serializer("ReportAnswer", fields={
        "applied": serializers.BooleanField(), "instance": serializers.DictField(allow_null=True)})})
    def post(self, request, pk: int):
        """Something happened to one of this worker's instances (or parts): the lifecycle action it names is applied
        if the instance is still where the worker thinks; the answer carries the instance as the server now holds
        it (null when it is gone)."""
        body = ReportSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        with transaction.atomic():
            applied, instance_id = apply_report(self.worker, body.validated_data)
            if applied and body.validated_data["event"] in ("failed", "restart", "part_failed"):
                nudge_parts(instance_id)
        current = assignments_of(self.worker, [instance_id]) if instance_id else []
        return Response({"applied": applied, "instance": current[0] if current else None}, status=status.HTTP_200_OK)
