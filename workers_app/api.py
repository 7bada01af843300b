from __future__ import annotations

from django.http.request import split_domain_port
from drf_spectacular.utils import extend_schema, inline_serializer
from rest_framework import mixins, permissions, serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.response import Response
from rest_framework.views import APIView

from gateway_app.authentication import bearer_token
from models_app.lifecycle import do_note_measured
from models_app.pagination import HeaderPagination
from workers_app import actions
from workers_app.cluster import CREDENTIAL_HEADER, broker_url_for, is_cluster_token
from workers_app.models import Worker
from workers_app.serializers import HeartbeatSerializer, WorkerLabelsSerializer, WorkerSerializer


class HasClusterToken(permissions.BasePermission):
    message = "A worker must present the cluster token (Authorization: Bearer <AIMIND_TOKEN>)."

    def has_permission(self, request, view) -> bool:
        return is_cluster_token(bearer_token(request.headers.get("Authorization")))


class WorkerViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, mixins.UpdateModelMixin,
                    mixins.DestroyModelMixin, viewsets.GenericViewSet):
    queryset = Worker.objects.order_by("id")
    serializer_class = WorkerSerializer

    def get_authenticators(self):
        if self.request is not None and self._is_worker_call():
            return []  # workers authenticate with the cluster token, checked by HasClusterToken
        return super().get_authenticators()

    def _is_worker_call(self) -> bool:
        return self.request.method == "POST" and (
            self.request.path.rstrip("/").endswith("/workers") or self.request.path.rstrip("/").endswith("/heartbeat"))

    def get_permissions(self):
        if self.action in ("create", "heartbeat"):
            return [HasClusterToken()]
        return super().get_permissions()

    def get_serializer_class(self):
        if self.action in ("update", "partial_update"):
            return WorkerLabelsSerializer
        return super().get_serializer_class()

    @extend_schema(request=WorkerSerializer, responses=WorkerSerializer)
    def create(self, request, *args, **kwargs):
        """Register or re-register a worker (the cluster token; and to re-register, the worker's own credential from
        its first registration, in `X-Worker-Credential`). A new credential comes back as `credential`, once."""
        serializer = WorkerSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        try:
            worker, issued = actions.do_register_worker(serializer.validated_data,
                                                        request.headers.get(CREDENTIAL_HEADER))
        except actions.NameTaken as taken:
            return Response({"detail": f"worker {taken} is registered and alive; re-registering it needs its own "
                                       f"credential ({CREDENTIAL_HEADER}), or wait until it is not ready"},
                            status=status.HTTP_409_CONFLICT)
        body = WorkerSerializer(worker).data
        # The broker (with its password) for the worker's queue and log shipping: a worker node needs nothing else.
        body["broker_url"] = broker_url_for(split_domain_port(request.get_host())[0].strip("[]"))
        if issued:
            body["credential"] = issued
        return Response(body, status=status.HTTP_201_CREATED)

    def perform_update(self, serializer):
        actions.do_update_worker(serializer.instance, serializer.validated_data)

    def update(self, request, *args, **kwargs):
        super().update(request, *args, **kwargs)
        return Response(WorkerSerializer(self.get_object()).data)

    def perform_destroy(self, instance):
        actions.do_delete_worker(instance)

    @extend_schema(request=HeartbeatSerializer, responses=WorkerSerializer)
    @action(detail=True, methods=["post"])
    def heartbeat(self, request, pk=None):
        worker = self.get_object()
        if worker.credential_hash and not actions.holds_credential(worker, request.headers.get(CREDENTIAL_HEADER)):
            return Response({"detail": f"a heartbeat for worker {worker.name} needs its credential "
                                       f"({CREDENTIAL_HEADER})"}, status=status.HTTP_403_FORBIDDEN)
        body = HeartbeatSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        worker = actions.do_heartbeat(worker, body.validated_data.get("status"))
        if body.validated_data["measured"]:
            do_note_measured(worker.pk, body.validated_data["measured"])
        return Response(WorkerSerializer(worker).data)


class GpuListView(APIView):
    """Every GPU in the cluster, with id `<worker name>:<index>`."""

    required_permissions = ["workers_app.view_worker"]

    @extend_schema(responses={200: inline_serializer("Gpu", many=True, fields={
        "id": serializers.CharField(), "worker_name": serializers.CharField(), "worker_id": serializers.IntegerField(),
        "index": serializers.IntegerField(), "name": serializers.CharField(), "vendor": serializers.CharField(),
        "memory": serializers.DictField(child=serializers.IntegerField())})})
    def get(self, request):
        gpus = []
        for worker in Worker.objects.order_by("name"):
            for gpu in worker.gpus:
                gpus.append({"id": f"{worker.name}:{gpu.get('index')}", "worker_name": worker.name,
                             "worker_id": worker.id, **gpu})
        paginator = HeaderPagination()
        return paginator.get_paginated_response(paginator.paginate_queryset(gpus, request, view=self))
