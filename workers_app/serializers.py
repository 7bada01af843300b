from __future__ import annotations

from rest_framework import serializers

from workers_app.models import Worker


class GpuStatusSerializer(serializers.Serializer):
    index = serializers.IntegerField(min_value=0)
    name = serializers.CharField(required=False, allow_blank=True, default="")
    vendor = serializers.CharField(required=False, allow_blank=True, default="")
    uuid = serializers.CharField(required=False, allow_blank=True, default="")
    memory = serializers.DictField(child=serializers.IntegerField(min_value=0))
    core = serializers.DictField(required=False, default=dict)
    compute_capability = serializers.CharField(required=False, allow_blank=True, default="", max_length=16)


class BackendCapabilitySerializer(serializers.Serializer):
    """What a worker can run of one backend: the build it needs, whether it can install it, what it has."""

    variant = serializers.CharField(required=False, allow_blank=True, default="", max_length=64)
    installable = serializers.BooleanField(required=False, default=True)
    reason = serializers.CharField(required=False, allow_blank=True, default="", max_length=1000)
    default_version = serializers.CharField(required=False, allow_blank=True, default="", max_length=64)
    installed = serializers.ListField(child=serializers.CharField(max_length=64), required=False, default=list,
                                      max_length=1000)


class WorkerStatusSerializer(serializers.Serializer):
    cpu = serializers.DictField(child=serializers.IntegerField(min_value=0), required=False, default=dict)
    memory = serializers.DictField(child=serializers.IntegerField(min_value=0), required=False, default=dict)
    gpus = GpuStatusSerializer(many=True, required=False, default=list)
    backends = serializers.DictField(child=BackendCapabilitySerializer(), required=False)


class WorkerSerializer(serializers.ModelSerializer):
    status = WorkerStatusSerializer(required=False)
    labels = serializers.DictField(child=serializers.CharField(allow_blank=True), required=False)
    system_reserved = serializers.DictField(child=serializers.IntegerField(min_value=0), required=False)

    class Meta:
        model = Worker
        fields = ["id", "name", "hostname", "ip", "labels", "system_reserved", "status", "state", "state_message",
                  "last_heartbeat_at", "created_at", "updated_at"]
        read_only_fields = ["state", "state_message", "last_heartbeat_at", "created_at", "updated_at"]
        extra_kwargs = {"name": {"validators": []}}  # registering again under the same name is an update


class WorkerLabelsSerializer(serializers.ModelSerializer):
    """What an operator may change on a worker: its labels (and reservation)."""

    labels = serializers.DictField(child=serializers.CharField(allow_blank=True), required=False)
    system_reserved = serializers.DictField(child=serializers.IntegerField(min_value=0), required=False)

    class Meta:
        model = Worker
        fields = ["labels", "system_reserved"]


class HeartbeatSerializer(serializers.Serializer):
    status = WorkerStatusSerializer(required=False)
