"""A cluster's deployments as a file: export_models writes every model's settings, import_models creates or updates
them by name (idempotent, all or nothing), so an export, a wiped database and an import give the same models."""

import io

import pytest
import yaml
from django.core.management import CommandError, call_command

from models_app import actions
from models_app.models import Model
from models_app.portable import FIELDS
from tests.fixtures.tiny_gguf import write_tiny_llama

pytestmark = pytest.mark.django_db


def run(*args, stdin: str | None = None, monkeypatch=None) -> str:
    out = io.StringIO()
    if stdin is not None:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    call_command(*args, stdout=out)
    return out.getvalue()


def settings_of(model: Model) -> dict:
    return {field: getattr(model, field) for field in FIELDS}


@pytest.fixture
def two_models(tmp_path):
    local = actions.do_create_model(name="local-chat", source="local_path", replicas=2,
                                    local_path=str(write_tiny_llama(tmp_path / "m.gguf")),
                                    backend_parameters=["--ctx-size", "512"], env={"OMP_NUM_THREADS": "2"},
                                    worker_selector={"zone": "a"}, placement_strategy="binpack")
    hub = actions.do_create_model(name="hub-中文", source="huggingface", huggingface_repo_id="acme/tiny-GGUF",
                                  huggingface_filename="*Q4_K_M*.gguf", replicas=0, restart_on_error=False,
                                  description="a model with\na long description")
    return [settings_of(Model.objects.get(pk=m.pk)) for m in (local, hub)]


def test_export_then_wipe_then_import_gives_the_same_models(two_models, tmp_path):
    exported = run("export_models")
    assert yaml.safe_load(exported)["aimind_models"] == 1
    (tmp_path / "models.yaml").write_text(exported, encoding="utf-8")
    for model in Model.objects.all():
        actions.do_delete_model(model)
    assert run("import_models", str(tmp_path / "models.yaml")).splitlines() == [
        "created: 2 (hub-中文, local-chat)", "updated: 0", "unchanged: 0"]
    assert sorted((settings_of(m) for m in Model.objects.all()), key=lambda s: s["name"]) == \
        sorted(two_models, key=lambda s: s["name"])
    assert Model.objects.get(name="local-chat").instances.count() == 2  # replicas came back with the model
    assert run("import_models", str(tmp_path / "models.yaml")).splitlines()[2] == "unchanged: 2 (hub-中文, local-chat)"


def test_an_edited_file_updates_by_name_and_leaves_other_models_alone(two_models, monkeypatch):
    document = yaml.safe_load(run("export_models"))
    [local] = [m for m in document["models"] if m["name"] == "local-chat"]
    local["backend_parameters"] = ["--ctx-size", "1024"]
    document["models"] = [local]
    before = Model.objects.get(name="local-chat").config_version
    out = run("import_models", "-", stdin=yaml.safe_dump(document), monkeypatch=monkeypatch)
    assert out.splitlines()[1] == "updated: 1 (local-chat)"
    model = Model.objects.get(name="local-chat")
    assert model.backend_parameters == ["--ctx-size", "1024"] and model.config_version == before + 1
    assert Model.objects.filter(name="hub-中文").exists()


@pytest.mark.parametrize("text, says", [
    ("models: [", "not YAML"),
    ("just words", "a mapping with a `models` list"),
    ("aimind_models: 9\nmodels: []", "format 9 is not 1"),
    ("models:\n- name: new-one\n  source: huggingface\n  huggingface_repo_id: a/b\n  huggingface_filename: x.gguf\n"
     "- name: bad\n  source: huggingface\n  huggingface_repo_id: a/b\n  placement_strategy: nearest\n",
     "model bad: placement_strategy: "),
    ("models:\n- name: odd\n  source: huggingface\n  colour: blue\n", "model odd: unknown field(s) colour"),
    ("models:\n- name: twice\n  source: huggingface\n  huggingface_repo_id: a/b\n- name: twice\n", "named twice"),
])
def test_a_refused_file_says_where_and_changes_nothing(text, says, monkeypatch):
    with pytest.raises(CommandError, match="nothing was changed") as refused:
        run("import_models", "-", stdin=text, monkeypatch=monkeypatch)
    assert says in str(refused.value)
    assert not Model.objects.exists()  # not even the valid model before the bad one
