from __future__ import annotations

from rest_framework import serializers

from workers_app.models import Worker

BYTES = {"min_value": 0, "max_value": 1 << 62}  # memory sizes: 4 EiB is beyond any machine


def bounded_labels() -> serializers.DictField:
    return serializers.DictField(child=serializers.CharField(allow_blank=True, max_length=255), required=False)


def check_labels(value: dict) -> dict:
    if len(value) > 64 or any(not str(k).strip() or len(str(k)) > 255 for k in value):
        raise serializers.ValidationError("at most 64 labels, each with a key of 1 to 255 characters")
    return value


class ReservedField(serializers.DictField):
    """`system_reserved`: the RAM (`ram`) and the VRAM per GPU (`vram`) a worker keeps for itself, in bytes."""

    KEYS = ("ram", "vram")

    def __init__(self, **kwargs):
        super().__init__(child=serializers.IntegerField(**BYTES), required=False, **kwargs)

    def to_internal_value(self, data):
        value = super().to_internal_value(data)
        unknown = sorted(set(value) - set(self.KEYS))
        if unknown:
            raise serializers.ValidationError(f"unknown key {unknown[0]!r}: system_reserved takes ram and vram "
                                              f"(bytes)")
        return value


class GpuStatusSerializer(serializers.Serializer):
    index = serializers.IntegerField(min_value=0, max_value=1023)
    name = serializers.CharField(required=False, allow_blank=True, default="", max_length=255)
    vendor = serializers.CharField(required=False, allow_blank=True, default="", max_length=64)
    uuid = serializers.CharField(required=False, allow_blank=True, default="", max_length=128)
    memory = serializers.DictField(child=serializers.IntegerField(**BYTES))
    core = serializers.DictField(child=serializers.IntegerField(min_value=0, max_value=100000), required=False,
                                 default=dict)
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
    cpu = serializers.DictField(child=serializers.IntegerField(min_value=0, max_value=1_000_000), required=False,
                                default=dict)
    memory = serializers.DictField(child=serializers.IntegerField(**BYTES), required=False, default=dict)
    gpus = GpuStatusSerializer(many=True, required=False, default=list, max_length=256)
    backends = serializers.DictField(child=BackendCapabilitySerializer(), required=False)

    def validate_backends(self, value):
        if len(value) > 32:
            raise serializers.ValidationError("at most 32 backends")
        return value


class WorkerSerializer(serializers.ModelSerializer):
    name = serializers.RegexField(r"^[A-Za-z0-9][\w.@:-]{0,254}$", error_messages={
        "invalid": "letters, digits and . _ - @ : only, starting with a letter or digit (it names a queue)"})
    status = WorkerStatusSerializer(required=False)
    labels = bounded_labels()
    system_reserved = ReservedField()

    def validate_labels(self, value):
        return check_labels(value)

    class Meta:
        model = Worker
        fields = ["id", "name", "hostname", "ip", "labels", "system_reserved", "status", "state", "state_message",
                  "last_heartbeat_at", "created_at", "updated_at"]
        read_only_fields = ["state", "state_message", "last_heartbeat_at", "created_at", "updated_at"]
        extra_kwargs = {"name": {"validators": []}}  # registering again under the same name is an update


class WorkerLabelsSerializer(serializers.ModelSerializer):
    """What an operator may change on a worker: its labels (and reservation)."""

    labels = bounded_labels()
    system_reserved = ReservedField()

    def validate_labels(self, value):
        return check_labels(value)

    class Meta:
        model = Worker
        fields = ["labels", "system_reserved"]


MAX_MEASURED = 1024  # backends one heartbeat may report
MAX_GPUS = 64


def _ids(value: dict, what: str, limit: int) -> dict:
    if len(value) > limit:
        raise serializers.ValidationError(f"at most {limit} {what}, got {len(value)}")
    for key in value:
        if not (isinstance(key, str) and key.isascii() and key.isdigit() and len(key) <= 12 and
                str(int(key)) == key):
            raise serializers.ValidationError(f"{what} are keyed by their number, got {key!r}")
    return value


class MeasuredSerializer(serializers.Serializer):
    ram = serializers.IntegerField(min_value=0, max_value=2**62)
    vram = serializers.DictField(child=serializers.IntegerField(min_value=0, max_value=2**62), required=False,
                                 default=dict)

    def validate_vram(self, value: dict) -> dict:
        return _ids(value, "GPU indexes", MAX_GPUS)


class HeartbeatSerializer(serializers.Serializer):
    status = WorkerStatusSerializer(required=False)
    measured = serializers.DictField(child=MeasuredSerializer(), required=False, default=dict,
                                     help_text="What each backend really uses, by instance id.")

    def validate_measured(self, value: dict) -> dict:
        return _ids(value, "instance ids", MAX_MEASURED)
