from __future__ import annotations

import hashlib
import secrets

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import models
from django.utils import timezone
from django.utils.translation import gettext_lazy as _

from gateway_app import changes

KEY_PREFIX = "aimind-"
LIMIT_FIELDS = ("allowed_models", "requests_per_minute", "tokens_per_minute", "tokens_per_day")
MAX_LIMIT = 2_000_000_000  # what the column holds
MAX_ALLOWED_MODELS = 1000


def hash_key(raw_key: str) -> str:
    return hashlib.sha256(raw_key.encode()).hexdigest()


def check_allowed_models(value) -> list[str]:
    """An API key's `allowed_models`: a list of model names (empty: every model), stripped, each once. The API and
    the admin share it."""
    if value in (None, ""):
        return []
    if not isinstance(value, list):
        raise ValidationError('must be a list of model names, e.g. ["qwen"]; empty: every model')
    if len(value) > MAX_ALLOWED_MODELS:
        raise ValidationError(f"at most {MAX_ALLOWED_MODELS} models, got {len(value)}")
    for name in value:
        if not isinstance(name, str) or not name.strip() or len(name) > 255:
            raise ValidationError(f"{name!r} is not a model name (a non-empty string of at most 255 characters)")
    return list(dict.fromkeys(name.strip() for name in value))


class KeyScope(models.TextChoices):
    ADMIN = "admin", _("Management API and gateway")
    INFERENCE = "inference", _("Gateway (/v1) only")


class ApiKey(models.Model):
    """A bearer key for the API and the OpenAI-compatible gateway; only its hash is stored. A key can expire, be
    revoked (the API at once; the gateway's in-memory tables within a second), and be scoped to inference only."""

    name = models.CharField(max_length=255)
    scope = models.CharField(max_length=16, choices=KeyScope.choices, default=KeyScope.ADMIN)
    expires_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True, editable=False)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_keys")
    key_hash = models.CharField(max_length=64, unique=True, editable=False)
    key_prefix = models.CharField(max_length=16, editable=False, help_text="The first characters, to tell keys apart.")
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    # Quotas and rate limits (blank: no limit). Enforced by the gateway, counted in Redis across web processes.
    allowed_models = models.JSONField(
        _("Allowed models"), default=list, blank=True,
        help_text=_("Names of the models this key may call; empty: every model."))
    requests_per_minute = models.PositiveIntegerField(_("Requests per minute"), null=True, blank=True)
    tokens_per_minute = models.PositiveIntegerField(_("Tokens per minute"), null=True, blank=True)
    tokens_per_day = models.PositiveIntegerField(_("Tokens per day"), null=True, blank=True)

    class Meta:
        ordering = ["name"]
        verbose_name = "API key"

    def __str__(self) -> str:
        return f"{self.name} ({self.key_prefix}…)"

    @classmethod
    def issue(cls, user, name: str, scope: str = KeyScope.ADMIN, expires_at=None, **limits) -> tuple[ApiKey, str]:
        """A new key and its secret (shown once); `limits`: allowed_models, requests_per_minute, tokens_per_minute,
        tokens_per_day."""
        raw = KEY_PREFIX + secrets.token_urlsafe(32)
        key = cls.objects.create(name=name, user=user, key_hash=hash_key(raw), key_prefix=raw[: len(KEY_PREFIX) + 6],
                                 scope=scope, expires_at=expires_at, **limits)
        return key, raw

    def usable(self) -> bool:
        """Not revoked, not expired, and its user still active."""
        return (self.revoked_at is None and (self.expires_at is None or self.expires_at > timezone.now())
                and self.user.is_active)

    def revoke(self) -> None:
        if ApiKey.objects.filter(pk=self.pk, revoked_at__isnull=True).update(revoked_at=timezone.now()):
            changes.revoked(self.key_hash)  # an update sends no post_save

    @classmethod
    def find(cls, raw_key: str) -> ApiKey | None:
        """The usable key behind this bearer token, or None."""
        key = cls.objects.select_related("user").filter(key_hash=hash_key(raw_key)).first()
        return key if key is not None and key.usable() else None

    @classmethod
    def user_for(cls, raw_key: str):
        """The user of a usable management key (an inference-only key manages nothing), or None."""
        key = cls.find(raw_key)
        return key.user if key is not None and key.scope == KeyScope.ADMIN else None


class Usage(models.Model):
    """What the gateway passed, per day, API key and model: requests and the tokens the backends reported. Each web
    process counts in memory and adds its counts here in batches."""

    day = models.DateField()
    api_key = models.ForeignKey(ApiKey, on_delete=models.SET_NULL, null=True, related_name="usage")
    model_name = models.CharField(max_length=255, help_text="The model as clients named it (kept when it is deleted).")
    requests = models.PositiveBigIntegerField(default=0)
    prompt_tokens = models.PositiveBigIntegerField(default=0)
    completion_tokens = models.PositiveBigIntegerField(default=0)

    class Meta:
        ordering = ["day", "model_name"]
        verbose_name = "usage"
        verbose_name_plural = "usage"
        constraints = [models.UniqueConstraint(fields=["day", "api_key", "model_name"], name="usage_per_day_key_model")]

    def __str__(self) -> str:
        return f"{self.day} {self.model_name}: {self.requests} requests"


class UsageMinute(models.Model):
    """What the gateway passed in one minute, per API key and model: requests, errors, tokens and the latency
    histogram (counts per aimind.metrics.LATENCY_BUCKETS, then +Inf). For the dashboard's last hour and day; kept
    AIMIND_SAMPLE_RETENTION_HOURS."""

    minute = models.DateTimeField(db_index=True)
    api_key = models.ForeignKey(ApiKey, on_delete=models.SET_NULL, null=True, related_name="usage_minutes")
    model_name = models.CharField(max_length=255)
    requests = models.PositiveIntegerField(default=0)
    errors = models.PositiveIntegerField(default=0, help_text="Answers that were not 2xx, and clients that left.")
    prompt_tokens = models.PositiveBigIntegerField(default=0)
    completion_tokens = models.PositiveBigIntegerField(default=0)
    latency_seconds = models.FloatField(default=0, help_text="The sum over its requests.")
    latency_buckets = models.JSONField(default=list, blank=True)

    class Meta:
        ordering = ["minute", "model_name"]
        constraints = [models.UniqueConstraint(fields=["minute", "api_key", "model_name"],
                                               name="usage_per_minute_key_model")]

    def __str__(self) -> str:
        return f"{self.minute:%Y-%m-%d %H:%M} {self.model_name}: {self.requests} requests"
