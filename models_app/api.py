from __future__ import annotations

from django.db.models import Count, Q
from django.http import HttpResponse
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import mixins, serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import NotFound, ValidationError
from rest_framework.response import Response

from models_app import actions
from models_app.choices import DELETED, InstanceState
from models_app.models import MAX_ID, InstanceEvent, Model, ModelInstance
from models_app.serializers import (
    DeletedInstanceSerializer,
    InstanceEventSerializer,
    ModelInstanceSerializer,
    ModelSerializer,
)
from workers_app import logs


class ModelViewSet(viewsets.ModelViewSet):
    serializer_class = ModelSerializer
    action_permissions = {"stop": ["models_app.change_model"], "start": ["models_app.change_model"],
                          "instances": ["models_app.view_modelinstance"]}
    queryset = Model.objects.annotate(
        ready_replicas_count=Count("instances", filter=Q(instances__state=InstanceState.RUNNING))
    ).order_by("id")

    def perform_create(self, serializer):
        serializer.instance = actions.do_create_model(**serializer.validated_data)

    def perform_update(self, serializer):
        serializer.instance = actions.do_update_model(serializer.instance, serializer.validated_data,
                                                      by=self.request.user.get_username())

    def perform_destroy(self, instance):
        actions.do_delete_model(instance, by=self.request.user.get_username())

    def _scaled(self, replicas: int) -> Response:
        model = actions.do_scale_model(self.get_object(), replicas, by=self.request.user.get_username())
        return Response(self.get_serializer(self.get_queryset().get(pk=model.pk)).data)

    @extend_schema(request=None, responses=ModelSerializer)
    @action(detail=True, methods=["post"])
    def stop(self, request, pk=None):
        return self._scaled(0)

    @extend_schema(request=None, responses=ModelSerializer)
    @action(detail=True, methods=["post"])
    def start(self, request, pk=None):
        return self._scaled(1)

    @extend_schema(responses=ModelInstanceSerializer(many=True))
    @action(detail=True, methods=["get"])
    def instances(self, request, pk=None):
        model = self.get_object()
        page = self.paginate_queryset(model.instances.select_related("worker", "model").order_by("id"))
        return self.get_paginated_response(ModelInstanceSerializer(page, many=True).data)


class TailQuery(serializers.Serializer):
    tail = serializers.IntegerField(min_value=1, max_value=10000, default=200)
    attempt = serializers.IntegerField(min_value=1, required=False,
                                       help_text="One kept attempt's log (see logs/attempts); the live log if absent.")


class LogAttemptSerializer(serializers.Serializer):
    attempt = serializers.IntegerField()
    started_at = serializers.CharField()
    ended_at = serializers.CharField(allow_null=True)
    exit_code = serializers.IntegerField(allow_null=True)
    exit = serializers.CharField(help_text='How it ended ("exited with code 1", "stopped"); empty while it runs.')
    current = serializers.BooleanField()


class ModelInstanceViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, mixins.DestroyModelMixin,
                           viewsets.GenericViewSet):
    serializer_class = ModelInstanceSerializer
    queryset = ModelInstance.objects.select_related("worker", "model").order_by("id")

    def perform_destroy(self, instance):
        actions.do_delete_instance(instance, by=self.request.user.get_username())

    @extend_schema(responses=InstanceEventSerializer(many=True))
    @action(detail=True, methods=["get"])
    def events(self, request, pk=None):
        """The instance's history: every transition, oldest first (kept for AIMIND_EVENT_RETENTION_DAYS). A deleted
        instance's history answers too, ending with its `deleted` event, until it is pruned."""
        if not str(pk).isascii() or not str(pk).isdigit() or int(pk) > MAX_ID:
            raise NotFound()
        history = InstanceEvent.objects.filter(instance_id=int(pk)).order_by("id")
        if not ModelInstance.objects.filter(pk=int(pk)).exists() and not history.exists():
            raise NotFound()
        page = self.paginate_queryset(history)
        return self.get_paginated_response(InstanceEventSerializer(page, many=True).data)

    @extend_schema(parameters=[OpenApiParameter("model", int, description="Only this model's (by id).")],
                   responses=DeletedInstanceSerializer(many=True))
    @action(detail=False, methods=["get"])
    def deleted(self, request):
        """Instances deleted within AIMIND_EVENT_RETENTION_DAYS, newest first, from their last event: when, why and
        by whom; each one's history is at `/api/v1/instances/{id}/events`."""
        found = InstanceEvent.objects.filter(to_state=DELETED).order_by("-id")
        model = request.query_params.get("model", "")
        if model:
            if not model.isascii() or not model.isdigit() or int(model) > MAX_ID:
                raise ValidationError({"model": ["a model id"]})
            found = found.filter(details__model_id=int(model))
        page = self.paginate_queryset(found)
        return self.get_paginated_response(DeletedInstanceSerializer(page, many=True).data)

    @extend_schema(parameters=[TailQuery], responses={(200, "text/plain"): str})
    @action(detail=True, methods=["get"])
    def logs(self, request, pk=None):
        """The log's last lines: the live log (every recent start), or with `attempt` one start's own log, kept
        when the backend was restarted (the last AIMIND_INSTANCE_LOG_ATTEMPTS)."""
        instance = self.get_object()
        query = TailQuery(data=request.query_params)
        query.is_valid(raise_exception=True)
        tail, attempt = query.validated_data["tail"], query.validated_data.get("attempt")
        lines = logs.last_lines(instance.pk, tail) if attempt is None else logs.attempt_lines(instance.pk, attempt,
                                                                                               tail)
        if lines is None:
            kept = ", ".join(str(a["attempt"]) for a in logs.attempts(instance.pk)) or "none"
            return Response({"attempt": [f"attempt {attempt} of {instance.name} is not kept (kept: {kept})"]},
                            status=status.HTTP_404_NOT_FOUND)
        body = "\n".join(lines) + ("\n" if lines else "")
        return HttpResponse(body, content_type="text/plain; charset=utf-8", status=status.HTTP_200_OK)

    @extend_schema(responses=LogAttemptSerializer(many=True))
    @action(detail=True, methods=["get"], url_path="logs/attempts", url_name="log-attempts")
    def log_attempts(self, request, pk=None):
        """The kept starts of the instance's backend, newest (the current one) first: each one's number, when it
        started and ended, its exit code and how it ended. Read one with `logs?attempt=N`."""
        instance = self.get_object()
        return Response(LogAttemptSerializer(logs.attempts(instance.pk), many=True).data)
