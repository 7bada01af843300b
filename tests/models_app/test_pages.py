"""The product's pages server-side: who may see them, the form's round trip through the API's validation, the
actions behind the buttons, hostile text escaped, the guide's Chinese words, and the live fit line."""

import pytest
from django.contrib.auth import get_user_model
from django.test import Client

from models_app import actions
from models_app.models import Model, ModelInstance
from tests.factories import gpu_status, make_worker
from tests.fixtures.tiny_gguf import write_tiny_llama

pytestmark = pytest.mark.django_db


@pytest.fixture
def client(admin_user):
    client = Client()
    client.force_login(admin_user)
    return client


@pytest.fixture
def gguf(tmp_path):
    return write_tiny_llama(tmp_path / "m.gguf")


def deploy_form(path, **extra) -> dict:
    return {"source": "local_path", "local_path": str(path), "name": "paged", "replicas": "2",
            "placement_strategy": "binpack", "scheduling": "auto", "selector_key": ["zone", ""],
            "selector_value": ["a", ""], "param_name": ["--ctx-size", "--jinja"], "param_value": ["512", ""],
            "env_name": ["OMP_NUM_THREADS"], "env_value": ["2"], "restart_on_error": "on", **extra}


@pytest.mark.parametrize("path", ["/", "/models/deploy/", "/resources/"])
def test_anonymous_visits_go_to_sign_in_and_non_admins_are_refused(path):
    assert Client().get(path)["Location"] == f"/login/?next={path}"
    clerk = get_user_model().objects.create_user("clerk", password="pw")
    user = Client()
    user.force_login(clerk)
    assert user.get(path).status_code == 403


def test_only_admins_may_sign_in():
    get_user_model().objects.create_user("clerk", password="pw")
    response = Client().post("/login/", {"username": "clerk", "password": "pw"})
    assert response.status_code == 200 and "_auth_user_id" not in response.wsgi_request.session


def test_an_edit_that_changes_nothing_outdates_nothing(client, gguf):
    model = actions.do_create_model(name="paged", source="local_path", local_path=str(gguf), replicas=1,
                                    backend_parameters=["--ctx-size=512", "--jinja"], categories=["llm"],
                                    gpu_selector={"gpu_ids": ["g:0"]}, worker_selector={"zone": "a"})
    rows = client.get(f"/models/{model.pk}/edit/").context["values"]["param_rows"]
    form = deploy_form(gguf, scheduling="manual", gpu_ids=["g:0"], categories=["llm"], replicas="1",
                       param_name=[n for n, _ in rows], param_value=[v for _, v in rows],
                       env_name=[], env_value=[], cpu_offloading="on", distributed_inference_across_workers="on",
                       selector_key=[], selector_value=[])
    assert client.post(f"/models/{model.pk}/edit/", form).status_code == 302
    model.refresh_from_db()
    # Manual scheduling sent no strategy or selector: the stored ones stay; the parameters are the same ones.
    assert (model.config_version, model.worker_selector) == (1, {"zone": "a"})


def test_forms_need_their_csrf_token(admin_user, gguf):
    strict = Client(enforce_csrf_checks=True)
    strict.force_login(admin_user)
    assert strict.post("/models/deploy/", deploy_form(gguf)).status_code == 403
    assert not Model.objects.exists()


def test_deploy_form_creates_the_model_the_api_would(client, gguf):
    response = client.post("/models/deploy/", deploy_form(gguf))
    assert response.status_code == 302 and response["Location"] == "/"
    model = Model.objects.get(name="paged")
    assert (model.replicas, model.placement_strategy, model.worker_selector) == (2, "binpack", {"zone": "a"})
    assert model.backend_parameters == ["--ctx-size", "512", "--jinja"] and model.env == {"OMP_NUM_THREADS": "2"}
    assert (model.cpu_offloading, model.restart_on_error, model.gpu_selector) == (False, True, None)
    assert ModelInstance.objects.filter(model=model).count() == 2


def test_refusals_come_back_next_to_their_fields_with_the_input_kept(client, gguf):
    response = client.post("/models/deploy/", deploy_form(gguf, param_name=["--port"], param_value=["1"],
                                                          env_name=["CUDA_VISIBLE_DEVICES"], env_value=["0"]))
    page = response.content.decode()
    assert response.status_code == 400
    assert 'data-field="backend_parameters">--port is set by aiMindServe and cannot be overridden<' in page
    assert ('data-field="env">CUDA_VISIBLE_DEVICES is set by aiMindServe from the placement and cannot be '
            'overridden<') in page
    assert 'value="paged"' in page and not Model.objects.exists()


def test_edit_form_shows_the_model_and_an_edit_marks_instances_outdated(client, gguf):
    model = actions.do_create_model(name="paged", source="local_path", local_path=str(gguf),
                                    backend_parameters=["--ctx-size", "512"], gpu_selector={"gpu_ids": ["g:0"]})
    page = client.get(f"/models/{model.pk}/edit/").content.decode()
    assert 'value="--ctx-size"' in page and 'value="512"' in page and 'value="manual" checked' in page
    assert "marked outdated" in page
    response = client.post(f"/models/{model.pk}/edit/", deploy_form(gguf, replicas="1", param_value=["1024", ""]))
    assert response.status_code == 302
    model.refresh_from_db()
    assert model.config_version == 2 and all(i.outdated for i in model.instances.select_related("model"))


def test_stop_start_delete_and_instance_delete_call_the_actions(client, gguf):
    model = actions.do_create_model(name="paged", source="local_path", local_path=str(gguf), replicas=2)
    client.post(f"/models/{model.pk}/stop/")
    assert Model.objects.get().replicas == 0 and not ModelInstance.objects.exists()
    client.post(f"/models/{model.pk}/start/")
    [instance] = ModelInstance.objects.all()
    client.post(f"/instances/{instance.pk}/delete/")
    [replacement] = ModelInstance.objects.all()
    assert replacement.pk != instance.pk
    client.post(f"/models/{model.pk}/delete/")
    assert not Model.objects.exists()


def test_hostile_text_is_escaped_everywhere(client):
    hostile = '<script>alert(1)</script>'
    make_worker("w<b>", labels={"zone": hostile})
    model = actions.do_create_model(name="m", source="local_path", local_path="/m.gguf", description=hostile)
    ModelInstance.objects.filter(model=model).update(state="error", state_message=hostile)
    for path in ("/", "/resources/", f"/models/{model.pk}/edit/"):
        page = client.get(path).content.decode()
        assert "<script>alert(1)</script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page, path


def test_pages_speak_the_guides_chinese(client):
    actions.do_create_model(name="m", source="local_path", local_path="/m.gguf", replicas=0)
    models = client.get("/", HTTP_ACCEPT_LANGUAGE="zh-CN").content.decode()
    for word in ("模型", "部署模型", "操作", "编辑", "停止", "启动", "删除", "资源", "本地路径"):
        assert word in models, word
    form = client.get("/models/deploy/", HTTP_ACCEPT_LANGUAGE="zh-CN").content.decode()
    for word in ("搜索", "可用文件", "名称", "副本数", "模型路径", "高级", "模型类别", "调度类型", "自动", "手动",
                 "放置策略", "分散", "装箱", "工作节点选择器", "GPU 选择器", "后端", "后端版本", "后端参数", "环境变量",
                 "允许 CPU 卸载", "允许跨工作节点分布式推理", "错误时自动重启", "保存"):
        assert word in form, word
    assert "标签" in client.get("/resources/", HTTP_ACCEPT_LANGUAGE="zh-CN").content.decode()
    assert "登录" in Client().get("/login/", HTTP_ACCEPT_LANGUAGE="zh-CN").content.decode()


def test_the_language_switch_is_remembered(client):
    client.post("/i18n/setlang/", {"language": "zh-hans", "next": "/"})
    assert "部署模型" in client.get("/", HTTP_ACCEPT_LANGUAGE="en").content.decode()


def test_fit_line_answers_for_the_form_as_it_is(client, gguf):
    make_worker("g", status=gpu_status([24]), labels={"zone": "a"})
    fits = client.post("/models/evaluate/", deploy_form(gguf, name="")).json()
    assert fits["compatible"] and fits["summary"].startswith("Fits on g (GPU 0): claims ")
    misfit = client.post("/models/evaluate/", deploy_form(gguf, selector_key=["zone"], selector_value=["b"])).json()
    assert not misfit["compatible"] and "labels do not match zone=b" in misfit["summary"]


def test_logs_page_and_download(client, settings, tmp_path):
    model = actions.do_create_model(name="m", source="local_path", local_path="/m.gguf")
    [instance] = ModelInstance.objects.all()
    log = settings.DATA_DIR / "logs" / "instances" / f"{instance.pk}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("line one\nline <two>\n")
    page = client.get(f"/instances/{instance.pk}/logs/").content.decode()
    assert f'data-live="/ws/instances/{instance.pk}/logs"' in page and model.name in page
    download = client.get(f"/instances/{instance.pk}/logs/download")
    assert download["Content-Disposition"] == f'attachment; filename="{instance.name}.log"'
    assert download.content.decode() == "line one\nline <two>\n"


def test_the_instance_page_shows_why_there_and_its_timeline(client, gguf):
    from models_app import lifecycle
    from scheduler_app.scheduler import pending_instance_ids, schedule_instances

    make_worker("g", status=gpu_status([24]))
    make_worker("h", status=gpu_status([24]), labels={"zone": "b"})
    model = actions.do_create_model(name="m", source="local_path", local_path=str(gguf), worker_selector={})
    schedule_instances(pending_instance_ids())
    [instance] = ModelInstance.objects.filter(model=model)
    assert instance.worker.name == "g"
    lifecycle.do_begin_start(instance, "g", pid=4242, port=40001)
    lifecycle.do_mark_running(instance)
    lifecycle.do_fail_instance(instance, "backend killed by signal SIGKILL <b>", from_states=["running"])
    page = client.get(f"/instances/{instance.pk}/").content.decode()
    assert "Placed on <strong>g</strong> with score 100.0 (spread)." in page
    assert "<td>h</td>" in page and "same score (100.0); the chosen comes first by name" in page
    timeline = page[page.index('<ol class="timeline">'):]
    order = [timeline.index(f'data-cause="{cause}"') for cause in ("analyzing", "placed", "start", "healthy", "failed")]
    assert order == sorted(order)
    assert "backend killed by signal SIGKILL &lt;b&gt;" in timeline
    assert "Restart booked for " in page and "(restarted 0 times so far)" in page
    assert f'href="/instances/{instance.pk}/"' in client.get("/").content.decode()  # reached from the Models page
    zh = client.get(f"/instances/{instance.pk}/", HTTP_ACCEPT_LANGUAGE="zh-CN").content.decode()
    for word in ("调度原因", "时间线", "已调度", "未选原因", "申领"):
        assert word in zh, word
    assert Client().get(f"/instances/{instance.pk}/")["Location"] == f"/login/?next=/instances/{instance.pk}/"


def test_an_edit_that_outdates_an_instance_is_on_its_timeline(client, gguf):
    model = actions.do_create_model(name="m", source="local_path", local_path=str(gguf))
    [instance] = ModelInstance.objects.filter(model=model)
    actions.do_update_model(Model.objects.get(pk=model.pk), {"description": "only words"})  # live: no outdating
    actions.do_update_model(Model.objects.get(pk=model.pk), {"backend_parameters": ["--ctx-size", "1024"]})
    [event] = instance.events.filter(cause="outdated")
    assert (event.from_state, event.to_state) == ("pending", "pending")
    assert event.message.startswith("the model's configuration changed (backend_parameters)")
    page = client.get(f"/instances/{instance.pk}/").content.decode()
    assert 'data-cause="outdated"' in page and "Configuration changed" in page


def test_the_instance_page_says_when_its_memory_was_measured_as_a_time(client, gguf):
    model = actions.do_create_model(name="m", source="local_path", local_path=str(gguf))
    [instance] = ModelInstance.objects.filter(model=model)
    ModelInstance.objects.filter(pk=instance.pk).update(measured={
        "ram": 1024**3, "vram": {}, "over_claim": "", "at": "2026-12-02T03:04:05.678901+00:00"})
    page = client.get(f"/instances/{instance.pk}/").content.decode()
    assert "Measured by its worker at 2026-12-02 03:04:05 UTC." in page
