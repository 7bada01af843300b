"""Everything about a backend comes from its module in workers_app/backends: the choices, the automatic choice,
the scheduler's pipeline, the API's checks; a fourth backend is one more module."""

import pytest

from models_app.choices import BackendChoices
from scheduler_app.selectors import pipeline
from scheduler_app.selectors import vllm as vllm_selectors
from workers_app import backends
from workers_app.backends.base import Backend, NodeInfo, registered


def test_backend_choices_are_the_registry():
    assert [value for value, _ in BackendChoices.choices] == backends.names() == ["llama-box", "vllm", "vox-box"]
    assert BackendChoices.VLLM == "vllm"


@pytest.mark.parametrize(("fmt", "categories", "backend"), [
    ("gguf", ["llm"], "llama-box"), ("gguf", ["embedding"], "llama-box"), ("hf", ["llm"], "vllm"),
    ("hf", ["speech_to_text"], "vox-box"), ("hf", ["text_to_speech"], "vox-box"),
    ("faster-whisper", ["speech_to_text"], "vox-box"), ("hf", ["image"], "vllm"),
])
def test_automatic_choice_follows_format_and_category(fmt, categories, backend):
    assert backends.choose_backend(fmt, categories) == backend


def test_each_backend_names_its_selectors():
    assert pipeline("vllm") == [vllm_selectors.gpus_on_one_worker, vllm_selectors.cpu,
                                vllm_selectors.vllm_distributed.across_workers]
    assert all(pipeline(name) for name in backends.names())


class ToyBackend(Backend):
    name = "toy"
    label = "Toy"
    default_version = "1.0"
    formats = frozenset({"toy-format"})
    categories = frozenset({"llm"})
    selectors = "scheduler_app.selectors.vox_box.SELECTORS"
    reserved_flags = frozenset({"--listen"})


@pytest.fixture
def fourth_backend():
    backend = ToyBackend()
    registered()[backend.name] = backend
    yield backend
    del registered()[backend.name]


def test_a_fourth_backend_is_one_module(fourth_backend):
    assert "toy" in backends.names()
    assert backends.choose_backend("toy-format", ["llm"]) == "toy"
    assert backends.get_backend("toy").check_parameters(["--listen", "x"]) == [
        "--listen is set by aiMindServe and cannot be overridden"]
    assert pipeline("toy")
    assert backends.get_backend("toy").capability(NodeInfo())["default_version"] == "1.0"


def test_an_unknown_backend_is_a_permanent_error():
    with pytest.raises(backends.BackendError, match="'nope' is unknown") as caught:
        backends.get_backend("nope")
    assert caught.value.permanent


ORDINARY = ["loading model", "main: server is listening on http://127.0.0.1:4000"]


@pytest.mark.parametrize(("backend", "code", "lines", "healthy", "permanent"), [
    ("llama-box", 1, ["error: invalid argument: --no-such-flag"], False, True),
    ("vllm", 2, ["usage: api_server.py [-h]", "api_server.py: error: unrecognized arguments: --no-such-flag"], False,
     True),
    ("vllm", 2, ["api_server.py: error: argument --max-model-len: invalid int value: 'abc'"], False, True),
    ("vox-box", 0, ["INFO Loading model", "Unsupported model"], False, True),
    ("vox-box", 0, ORDINARY, True, False),
    ("llama-box", -9, ORDINARY, False, False),
    ("llama-box", 1, ["error: invalid argument: --x"], True, False),  # it served once: whatever ended it, retry
    ("vllm", 1, ["RuntimeError: CUDA out of memory"], False, False),
    ("llama-box", 1, ["CUDA error: invalid argument", "current device: 0"], False, False),
    ("vllm", 1, ["pydantic_core._pydantic_core.ValidationError: 1 validation error for ModelConfig"], False, True),
])
def test_exit_cause_tells_bad_arguments_from_crashes(backend, code, lines, healthy, permanent):
    assert backends.get_backend(backend).exit_is_permanent(code, lines, healthy) is permanent
