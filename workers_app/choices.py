from django.db import models
from django.utils.translation import gettext_lazy as _


class WorkerState(models.TextChoices):
    READY = "ready", _("Ready")
    NOT_READY = "not_ready", _("Not ready")
    UNREACHABLE = "unreachable", _("Unreachable")

    @classmethod
    def colour(cls, state: str) -> str:
        return {cls.READY: "#198754", cls.NOT_READY: "#fd7e14", cls.UNREACHABLE: "#dc3545"}.get(state, "#6c757d")


# A worker's moves: silent too long → not ready; a heartbeat → ready; unreachable when the server cannot reach it.
WORKER_TRANSITIONS: dict[str, frozenset[str]] = {
    WorkerState.READY: frozenset({WorkerState.NOT_READY, WorkerState.UNREACHABLE}),
    WorkerState.NOT_READY: frozenset({WorkerState.READY, WorkerState.UNREACHABLE}),
    WorkerState.UNREACHABLE: frozenset({WorkerState.READY, WorkerState.NOT_READY}),
}
