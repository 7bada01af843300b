"""/api/v1/keys: API keys through the API — issue one (its secret is in that answer only), list them, change one's
name, scope, expiry or limits, revoke one;
/api/v1/keys/usage: what the gateway passed, per model, per key and per day."""

from __future__ import annotations

from django.db.models import Sum
from drf_spectacular.utils import extend_schema
from rest_framework import mixins, serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.response import Response

from gateway_app import models as gateway_models
from gateway_app.models import ApiKey, KeyScope, Usage


def _limit(what: str) -> serializers.IntegerField:
    return serializers.IntegerField(min_value=1, max_value=gateway_models.MAX_LIMIT, allow_null=True, required=False,
                                    help_text=f"{what} the gateway passes for this key (more: 429 with Retry-After). "
                                              "Null: no limit.")


class ApiKeySerializer(serializers.ModelSerializer):
    name = serializers.CharField(max_length=255)
    scope = serializers.ChoiceField(KeyScope.choices, default=KeyScope.ADMIN)
    user = serializers.CharField(source="user.username", read_only=True)
    allowed_models = serializers.ListField(
        child=serializers.CharField(max_length=255), required=False, max_length=gateway_models.MAX_ALLOWED_MODELS,
        help_text="Names of the models this key may call (another: 403); empty: every model.")
    requests_per_minute = _limit("Requests per minute")
    tokens_per_minute = _limit("Tokens per minute (prompt and completion, as the backends count them)")
    tokens_per_day = _limit("Tokens per day (UTC)")

    class Meta:
        model = ApiKey
        fields = ["id", "name", "scope", "user", "key_prefix", "created_at", "last_used_at", "expires_at",
                  "revoked_at", *gateway_models.LIMIT_FIELDS]
        read_only_fields = ["key_prefix", "created_at", "last_used_at", "revoked_at"]

    def validate_allowed_models(self, value):
        return gateway_models.check_allowed_models(value)


class IssuedKeySerializer(ApiKeySerializer):
    key = serializers.CharField(read_only=True, help_text="The secret: shown in this answer only.")

    class Meta(ApiKeySerializer.Meta):
        fields = [*ApiKeySerializer.Meta.fields, "key"]


class UsageQuery(serializers.Serializer):
    since = serializers.DateField(required=False, help_text="First day counted (UTC), inclusive.")
    until = serializers.DateField(required=False, help_text="Last day counted (UTC), inclusive.")
    model = serializers.CharField(required=False, max_length=255, help_text="Only this model (its name).")
    key = serializers.IntegerField(required=False, min_value=1, help_text="Only this API key (its id).")


class UsageTotals(serializers.Serializer):
    requests = serializers.IntegerField()
    prompt_tokens = serializers.IntegerField()
    completion_tokens = serializers.IntegerField()


class ModelUsage(UsageTotals):
    model = serializers.CharField()


class KeyUsage(UsageTotals):
    key = serializers.IntegerField(allow_null=True)
    name = serializers.CharField(allow_null=True)


class DayUsage(UsageTotals):
    day = serializers.DateField()


class UsageSerializer(serializers.Serializer):
    models = ModelUsage(many=True)
    keys = KeyUsage(many=True)
    days = DayUsage(many=True)


def usage_totals(query: dict) -> dict:
    rows = Usage.objects.all()
    for field, lookup in (("since", "day__gte"), ("until", "day__lte"), ("model", "model_name"), ("key", "api_key")):
        if field in query:
            rows = rows.filter(**{lookup: query[field]})
    sums = {"requests": Sum("requests"), "prompt_tokens": Sum("prompt_tokens"),
            "completion_tokens": Sum("completion_tokens")}

    def grouped(*fields):
        return rows.order_by(*fields).values(*fields).annotate(**sums)

    return {"models": [{"model": r.pop("model_name"), **r} for r in grouped("model_name")],
            "keys": [{"key": r.pop("api_key"), "name": r.pop("api_key__name"), **r}
                     for r in grouped("api_key", "api_key__name")],
            "days": list(grouped("day"))}


class ApiKeyViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, mixins.CreateModelMixin,
                    mixins.UpdateModelMixin, mixins.DestroyModelMixin, viewsets.GenericViewSet):
    queryset = ApiKey.objects.select_related("user").order_by("id")
    serializer_class = ApiKeySerializer

    @extend_schema(request=ApiKeySerializer, responses=IssuedKeySerializer)
    def create(self, request, *args, **kwargs):
        body = ApiKeySerializer(data=request.data)
        body.is_valid(raise_exception=True)
        data = body.validated_data
        key, raw = ApiKey.issue(request.user, data["name"], data["scope"], data.get("expires_at"),
                                **{field: data[field] for field in gateway_models.LIMIT_FIELDS if field in data})
        key.key = raw
        return Response(IssuedKeySerializer(key).data, status=status.HTTP_201_CREATED)

    def perform_destroy(self, instance):
        instance.revoke()  # kept, revoked: its history (and who used it last) stays readable

    @extend_schema(parameters=[UsageQuery], responses=UsageSerializer)
    @action(detail=False, methods=["get"])
    def usage(self, request):
        """Requests and tokens through /v1 (as the backends reported them), per model, per key and per day (UTC).
        Each web process writes its counts every AIMIND_GATEWAY_USAGE_FLUSH_INTERVAL seconds."""
        query = UsageQuery(data=request.query_params)
        query.is_valid(raise_exception=True)
        return Response(UsageSerializer(usage_totals(query.validated_data)).data)
