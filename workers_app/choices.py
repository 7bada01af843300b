from django.db import models


class WorkerState(models.TextChoices):
    READY = "ready", "Ready"
    NOT_READY = "not_ready", "Not ready"
    UNREACHABLE = "unreachable", "Unreachable"

    @classmethod
    def colour(cls, state: str) -> str:
        return {cls.READY: "#198754", cls.NOT_READY: "#fd7e14", cls.UNREACHABLE: "#dc3545"}.get(state, "#6c757d")
