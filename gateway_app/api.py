"""/api/v1/keys: API keys through the API — issue one (its secret is in that answer only), list them, revoke one."""

from __future__ import annotations

from drf_spectacular.utils import extend_schema
from rest_framework import mixins, serializers, status, viewsets
from rest_framework.response import Response

from gateway_app.models import ApiKey, KeyScope


class ApiKeySerializer(serializers.ModelSerializer):
    name = serializers.CharField(max_length=255)
    scope = serializers.ChoiceField(KeyScope.choices, default=KeyScope.ADMIN)
    user = serializers.CharField(source="user.username", read_only=True)

    class Meta:
        model = ApiKey
        fields = ["id", "name", "scope", "user", "key_prefix", "created_at", "last_used_at", "expires_at",
                  "revoked_at"]
        read_only_fields = ["key_prefix", "created_at", "last_used_at", "revoked_at"]


class IssuedKeySerializer(ApiKeySerializer):
    key = serializers.CharField(read_only=True, help_text="The secret: shown in this answer only.")

    class Meta(ApiKeySerializer.Meta):
        fields = [*ApiKeySerializer.Meta.fields, "key"]


class ApiKeyViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, mixins.CreateModelMixin,
                    mixins.DestroyModelMixin, viewsets.GenericViewSet):
    queryset = ApiKey.objects.select_related("user").order_by("id")
    serializer_class = ApiKeySerializer

    @extend_schema(request=ApiKeySerializer, responses=IssuedKeySerializer)
    def create(self, request, *args, **kwargs):
        body = ApiKeySerializer(data=request.data)
        body.is_valid(raise_exception=True)
        key, raw = ApiKey.issue(request.user, body.validated_data["name"], body.validated_data["scope"],
                                body.validated_data.get("expires_at"))
        key.key = raw
        return Response(IssuedKeySerializer(key).data, status=status.HTTP_201_CREATED)

    def perform_destroy(self, instance):
        instance.revoke()  # kept, revoked: its history (and who used it last) stays readable
