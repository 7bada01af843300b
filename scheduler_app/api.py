"""POST /api/v1/evaluations: the scheduler's answer for model specs, without deploying anything."""

from __future__ import annotations

from drf_spectacular.utils import extend_schema
from rest_framework import serializers
from rest_framework.response import Response
from rest_framework.views import APIView

from models_app.models import Model
from models_app.serializers import ModelSerializer
from models_app.validation import flatten_errors
from scheduler_app.estimate import EstimateError, estimate_model
from scheduler_app.pool import read_pool
from scheduler_app.resources import WorkerResources
from scheduler_app.scheduler import collector_paused, find_placement
from scheduler_app.selectors.common import distributed_servers_for
from workers_app.models import Worker


class EvaluationSpecSerializer(ModelSerializer):
    name = serializers.CharField(required=False, default="evaluation", max_length=255)

    def validate_name(self, value):
        return value  # a dry run may reuse a deployed model's name

    def validate_replicas(self, value):
        return value  # nothing is deployed: the cluster's cap does not apply


class EvaluationRequestSerializer(serializers.Serializer):
    model_specs = serializers.ListField(child=serializers.DictField(), min_length=1, max_length=100)


def evaluate_spec(spec: dict, workers: list[Worker] | None = None, pool: list[WorkerResources] | None = None) -> dict:
    """The placement a deployment of `spec` would get now, or why it would get none: against `pool` (several specs,
    one read of the cluster), else the given workers, else the cluster read now."""
    serializer = EvaluationSpecSerializer(data=spec)
    if not serializer.is_valid():
        problems = "; ".join(f"{field}: {message}" for field, messages in serializer.errors.items()
                             for message in flatten_errors(messages))
        return {"compatible": False, "message": f"invalid model spec: {problems}", "placement": None}
    model = Model(**serializer.validated_data)  # never saved
    try:
        est = estimate_model(model)
    except EstimateError as exc:
        return {"compatible": False, "message": str(exc), "placement": None}
    result = find_placement(model, est, workers, pool)
    if result.candidate is None:
        return {"compatible": False, "message": result.message, "placement": None,
                "placement_explanation": result.explanation()}
    chosen = result.candidate
    return {"compatible": True, "message": result.message, "placement": {
        "worker_name": chosen.worker_name, "gpu_indexes": chosen.gpu_indexes,
        "computed_resource_claim": chosen.claim, "distributed_servers": distributed_servers_for(chosen)},
        "placement_explanation": result.explanation()}


class EvaluationView(APIView):
    required_permissions = ["models_app.add_model"]

    @extend_schema(request=EvaluationRequestSerializer, responses={200: dict})
    def post(self, request):
        body = EvaluationRequestSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        with collector_paused():
            pool = read_pool()
            results = [evaluate_spec(spec, pool=pool) for spec in body.validated_data["model_specs"]]
        return Response({"results": results})
