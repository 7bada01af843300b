"""Enumerations for models and instances; the colour per state is shared by admin and pages."""

from django.db import models
from django.utils.translation import gettext_lazy as _

from workers_app.backends import all_backends


class SourceChoices(models.TextChoices):
    HUGGINGFACE = "huggingface", "Hugging Face"
    MODELSCOPE = "modelscope", "ModelScope"
    LOCAL_PATH = "local_path", _("Local Path")


class CategoryChoices(models.TextChoices):
    LLM = "llm", "LLM"
    EMBEDDING = "embedding", _("Embedding")
    RERANKER = "reranker", _("Reranker")
    IMAGE = "image", _("Image")
    SPEECH_TO_TEXT = "speech_to_text", _("Speech to text")
    TEXT_TO_SPEECH = "text_to_speech", _("Text to speech")


class PlacementStrategyChoices(models.TextChoices):
    SPREAD = "spread", _("Spread")
    BINPACK = "binpack", _("Binpack")


# From the backends registry: adding a backend module adds its choice (LLAMA_BOX, VLLM, VOX_BOX …).
BackendChoices = models.TextChoices(
    "BackendChoices", [(b.name.upper().replace("-", "_"), (b.name, b.label)) for b in all_backends()])


class ErrorKind(models.TextChoices):
    """Why an instance is in error: what a restart cannot fix, or what it may."""

    PERMANENT = "permanent", _("Permanent: not restarted until the model is edited or the instance deleted")
    TRANSIENT = "transient", _("Transient: restarted with backoff")


class InstanceState(models.TextChoices):
    PENDING = "pending", _("Pending")
    ANALYZING = "analyzing", _("Analyzing")
    SCHEDULED = "scheduled", _("Scheduled")
    INITIALIZING = "initializing", _("Initializing")
    DOWNLOADING = "downloading", _("Downloading")
    STARTING = "starting", _("Starting")
    RUNNING = "running", _("Running")
    ERROR = "error", _("Error")
    UNREACHABLE = "unreachable", _("Unreachable")

    @classmethod
    def colour(cls, state: str) -> str:
        return _STATE_COLOURS.get(state, "#6c757d")

    @classmethod
    def on_worker(cls) -> list[str]:
        """States in which an instance holds (or is about to hold) a process on its worker."""
        return [cls.SCHEDULED, cls.INITIALIZING, cls.DOWNLOADING, cls.STARTING, cls.RUNNING]

    @classmethod
    def sources(cls, target: str) -> frozenset[str]:
        """The states from which an instance may move to `target`."""
        return frozenset(s for s, targets in INSTANCE_TRANSITIONS.items() if target in targets)


# Not a state an instance can be in: the `to_state` of the event recorded when its row is deleted (its history is kept).
DELETED = "deleted"
EVENT_STATE_CHOICES = [*InstanceState.choices, (DELETED, _("Deleted"))]

_S = InstanceState
# Every move an instance may make, declared once: the lifecycle's one transition function refuses any other.
INSTANCE_TRANSITIONS: dict[str, frozenset[str]] = {
    _S.PENDING: frozenset({_S.ANALYZING}),
    _S.ANALYZING: frozenset({_S.PENDING, _S.SCHEDULED, _S.ERROR}),  # no fit / placed / unreadable model
    _S.SCHEDULED: frozenset({_S.DOWNLOADING, _S.INITIALIZING, _S.STARTING, _S.ERROR, _S.UNREACHABLE, _S.PENDING}),
    _S.DOWNLOADING: frozenset({_S.INITIALIZING, _S.STARTING, _S.ERROR, _S.UNREACHABLE, _S.SCHEDULED, _S.PENDING}),
    _S.INITIALIZING: frozenset({_S.STARTING, _S.ERROR, _S.UNREACHABLE, _S.SCHEDULED, _S.PENDING}),
    _S.STARTING: frozenset({_S.RUNNING, _S.ERROR, _S.UNREACHABLE, _S.SCHEDULED, _S.PENDING}),
    _S.RUNNING: frozenset({_S.ERROR, _S.UNREACHABLE, _S.SCHEDULED, _S.PENDING}),
    _S.ERROR: frozenset({_S.SCHEDULED, _S.UNREACHABLE, _S.PENDING}),  # restart / worker lost / worker removed
    # placed elsewhere / its worker came back (restarted: start again; still running it: running; it died: error)
    _S.UNREACHABLE: frozenset({_S.PENDING, _S.SCHEDULED, _S.RUNNING, _S.ERROR}),
}

_STATE_COLOURS = {
    InstanceState.PENDING: "#6c757d",
    InstanceState.ANALYZING: "#6f42c1",
    InstanceState.SCHEDULED: "#0d6efd",
    InstanceState.INITIALIZING: "#0dcaf0",
    InstanceState.DOWNLOADING: "#0dcaf0",
    InstanceState.STARTING: "#fd7e14",
    InstanceState.RUNNING: "#198754",
    InstanceState.ERROR: "#dc3545",
    InstanceState.UNREACHABLE: "#b02a37",
}
