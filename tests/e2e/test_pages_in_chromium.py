"""The product's pages in real headless Chromium (Debian's, driven by Playwright), followed the way the guide tells a
person to: sign in, deploy from Hugging Face, ModelScope and a local path, watch the model run without reloading,
edit, stop, start, delete an instance, view its logs live, correct a refused field, label a worker so a waiting
model gets placed; hostile text stays text; the same in Simplified Chinese. Screenshots of each page are saved
under test-artifacts/screenshots/ for a person to look at."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Page, expect, sync_playwright

from tests.e2e.system import REPO, wait_until
from tests.fixtures.tiny_gguf import write_tiny_llama

SHOTS = REPO / "test-artifacts" / "screenshots"
RUN_TIMEOUT = 60_000  # ms: a tiny model from a stand-in hub downloads and starts in seconds
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                 "--disable-background-networking", "--disable-component-update"]


@pytest.fixture(scope="module")
def chromium():
    executable = shutil.which("chromium") or "/usr/bin/chromium"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def hub_weights(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("page-hub") / "Tiny-Page-Q8_0.gguf", seed=11, name="tiny-page")


@pytest.fixture(scope="module")
def page_repo(hubs, hub_weights):
    """A repo on both stand-in hubs with two quantizations, found by searching "pagetest"."""
    repo = "acme/PageTest-Tiny-GGUF"
    for hub in hubs.values():
        hub.add_repo(repo, {"PageTest-Tiny-Q8_0.gguf": hub_weights, "PageTest-Tiny-Q4_K_M.gguf": hub_weights,
                            "README.md": b"# tiny\n"}, downloads=1234, likes=56)
    return repo


def shot(page: Page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def sign_in(chromium, system, locale: str = "en-US", words=("Username", "Password", "Sign in")) -> Page:
    context = chromium.new_context(locale=locale, viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.on("dialog", lambda dialog: dialog.accept())  # Stop and Delete ask to confirm
    page.goto(system.base_url + "/")
    expect(page).to_have_url(re.compile(r"/login/\?next=/$"))
    page.get_by_label(words[0]).fill("admin")
    page.get_by_label(words[1]).fill("e2e-password")
    page.get_by_role("button", name=words[2]).click()
    expect(page).to_have_url(system.base_url + "/")
    return page


@pytest.fixture
def page(chromium, system):
    page = sign_in(chromium, system)
    yield page
    page.context.close()


def model_row(page: Page, name: str):
    return page.locator("tbody.model", has=page.locator("td.name strong", has_text=re.compile(f"^{name}$")))


def api_models(system) -> dict[str, dict]:
    with system.client() as c:
        return {m["name"]: m for m in c.get("/api/v1/models").json()}


def delete_models(system, *names: str) -> None:
    with system.client() as c:
        for name in names:
            model = api_models(system).get(name)
            if model:
                c.delete(f"/api/v1/models/{model['id']}")


def open_menu(scope) -> None:
    """The ⋯ button of a row's Actions (a <summary>), as the guide says: "click the ellipsis, then choose …"."""
    scope.locator("details.menu > summary").first.click()


def open_deploy(page: Page, source_label: str, deploy_words=("Deploy Model",)) -> None:
    page.get_by_text(deploy_words[0], exact=True).click()
    page.get_by_role("link", name=source_label).click()
    expect(page).to_have_url(re.compile(r"/models/deploy/\?source="))


def test_signing_in_and_out(chromium, system):
    page = sign_in(chromium, system)
    expect(page.get_by_role("heading", name="Models")).to_be_visible()
    shot(page, "models-empty-or-list")
    page.get_by_role("button", name="Sign out").click()
    expect(page).to_have_url(re.compile("/login/"))
    page.goto(system.base_url + "/resources/")
    expect(page).to_have_url(re.compile(r"/login/\?next=/resources/"))
    shot(page, "login")
    page.context.close()


@pytest.mark.parametrize(("hub", "label"), [("huggingface", "Hugging Face"), ("modelscope", "ModelScope")])
def test_deploy_from_a_hub_by_search_and_file_then_watch_it_run(page, system, page_repo, hub, label):
    open_deploy(page, label)
    page.evaluate("window.sameDocument = true")
    page.get_by_label("Search", exact=True).fill("pagetest")
    expect(page.get_by_label("GGUF")).to_be_checked()
    page.get_by_role("button", name="Search", exact=True).click()
    page.get_by_role("button", name=page_repo).click()
    expect(page.locator("#files")).to_contain_text("Q4_K_M")
    page.locator("#files label", has_text="Q8_0").click()
    expect(page.get_by_label("Name")).to_have_value("pagetest-tiny-q8_0")
    name = f"page-{hub}"
    page.get_by_label("Name").fill(name)
    page.get_by_text("Advanced", exact=True).click()
    page.get_by_role("textbox", name="Parameter", exact=True).fill("--ctx-size")
    page.get_by_role("textbox", name="Value", exact=True).first.fill("512")
    expect(page.locator("#fit")).to_contain_text("Fits on e2e-worker")
    shot(page, f"deploy-{hub}")
    page.get_by_role("button", name="Save").click()
    expect(page).to_have_url(system.base_url + "/")
    page.evaluate("window.sameDocument = true")  # set again on the Models page: a reload would lose it
    row = model_row(page, name)
    row.get_by_role("button", name="Instances").click()
    expect(row.locator(".summary")).to_contain_text("Running", timeout=RUN_TIMEOUT)
    expect(row.locator("tr[data-state=running]")).to_have_count(1)
    assert page.evaluate("window.sameDocument") is True  # seen live, without a reload
    shot(page, f"models-running-{hub}")
    assert api_models(system)[name]["huggingface_filename" if hub == "huggingface" else "model_scope_file_path"] \
        == "PageTest-Tiny-Q8_0.gguf"
    delete_models(system, name)


def test_local_path_edit_stop_start_and_replace_an_instance(page, system, tiny_models):
    open_deploy(page, "Local Path")
    page.get_by_label("Model path").fill(str(tiny_models["chat"]))
    page.get_by_label("Name").fill("page-local")
    page.get_by_label("Replicas").fill("1")
    page.get_by_role("button", name="Save").click()
    row = model_row(page, "page-local")
    expect(row.locator(".summary")).to_contain_text("Running", timeout=RUN_TIMEOUT)

    row.get_by_role("link", name="Edit").click()
    expect(page.get_by_text("Changes to the configuration apply to new instances", exact=False)).to_be_visible()
    page.get_by_label("Replicas").fill("2")
    shot(page, "edit")
    page.get_by_role("button", name="Save").click()
    row = model_row(page, "page-local")
    expect(row.locator(".ready")).to_have_text("2 / 2", timeout=RUN_TIMEOUT)

    open_menu(row.locator("tr.model-row"))
    row.get_by_role("button", name="Stop").click()
    row = model_row(page, "page-local")
    expect(row.locator(".ready")).to_have_text("0 / 0")
    expect(row.locator(".summary")).to_contain_text("Stopped")
    open_menu(row.locator("tr.model-row"))
    row.get_by_role("button", name="Start").click()
    row = model_row(page, "page-local")
    expect(row.locator(".ready")).to_have_text("1 / 1", timeout=RUN_TIMEOUT)

    row.get_by_role("button", name="Instances").click()
    first = row.locator("tr[data-instance-id]").first
    old_id = first.get_attribute("data-instance-id")
    open_menu(first)
    first.get_by_role("button", name="Delete").click()
    row = model_row(page, "page-local")
    expect(row.locator("tr[data-state=running]")).to_have_count(1, timeout=RUN_TIMEOUT)
    assert row.locator("tr[data-instance-id]").first.get_attribute("data-instance-id") != old_id
    shot(page, "models-instances")
    open_menu(row.locator("tr.model-row"))
    row.locator("tr.model-row").get_by_role("button", name="Delete").click()
    expect(model_row(page, "page-local")).to_have_count(0)


def test_logs_show_the_backlog_then_new_lines_live(page, system, deploy):
    model = deploy("page-logs")
    [running] = system.wait_for_instances(model["id"], "running")
    page.goto(f"{system.base_url}/instances/{running['id']}/logs/")
    log = page.locator("#log")
    expect(log).to_contain_text("starting:")  # the backlog: the launcher's marker line
    before = log.inner_text().count("\n")
    with system.client() as c:
        c.post("/v1/chat/completions", json={"model": "page-logs", "max_tokens": 4,
                                             "messages": [{"role": "user", "content": "hi"}]})
    wait_until(lambda: log.inner_text().count("\n") > before, 10, "a new log line on the page")
    shot(page, "logs")
    download = page.get_by_role("link", name="Download")
    assert download.get_attribute("href").endswith(f"/instances/{running['id']}/logs/download")


def test_a_refused_field_is_explained_next_to_it(page, system):
    page.goto(system.base_url + "/models/deploy/?source=local_path")
    page.get_by_label("Model path").fill("models/relative.gguf")
    page.get_by_label("Name").fill("page-refused")
    page.get_by_text("Advanced", exact=True).click()
    page.get_by_role("textbox", name="Parameter", exact=True).fill("--port")
    page.get_by_role("textbox", name="Value", exact=True).first.fill("8080")
    page.get_by_role("button", name="Save").click()
    expect(page.locator(".field-error[data-field=local_path]")).to_have_text("must be an absolute path")
    expect(page.locator(".field-error[data-field=backend_parameters]")).to_have_text(
        "--port is set by aiMindServe and cannot be overridden")
    expect(page.get_by_label("Name")).to_have_value("page-refused")  # what was typed stays
    shot(page, "deploy-refused")
    assert "page-refused" not in api_models(system)


def test_labelling_a_worker_places_the_model_that_waited_for_the_label(page, system, deploy):
    model = deploy("page-labels", worker_selector={"team": "blue"})
    [waiting] = system.wait_for_instances(model["id"], "pending", message="labels do not match team=blue")
    assert waiting["worker"] is None
    page.goto(system.base_url + "/resources/")
    row = page.locator("tr[data-worker=e2e-worker]")
    expect(row.locator(".bar")).to_have_count(2)  # CPU and RAM; no GPU here
    shot(page, "resources")
    row.get_by_role("link", name="Edit").click()
    page.get_by_role("textbox", name="Label key").last.fill("team")
    page.get_by_role("textbox", name="Label value").last.fill("blue")
    page.get_by_role("button", name="Save").click()
    expect(page.locator("tr[data-worker=e2e-worker] .labels")).to_contain_text("team=blue")
    try:
        system.wait_for_instances(model["id"], "running", timeout=30)
    finally:
        with system.client() as c:
            worker = next(w for w in c.get("/api/v1/workers").json() if w["name"] == "e2e-worker")
            labels = {k: v for k, v in worker["labels"].items() if k != "team"}
            c.patch(f"/api/v1/workers/{worker['id']}", json={"labels": labels})


def test_hostile_text_is_shown_as_text(page, system, deploy):
    payload = '<script>window.pwned = 1</script><img src=x onerror="window.pwned = 2">'
    deploy("page-hostile", replicas=0, description=payload)
    page.goto(system.base_url + "/")
    row = model_row(page, "page-hostile")
    expect(row.locator("td.name")).to_contain_text(payload)
    assert page.evaluate("window.pwned") is None
    with system.client() as c:  # and when the row arrives live, too
        model = api_models(system)["page-hostile"]
        c.patch(f"/api/v1/models/{model['id']}", json={"description": payload + " (live)"})
    expect(model_row(page, "page-hostile").locator("td.name")).to_contain_text("(live)")
    assert page.evaluate("window.pwned") is None


def test_the_guides_words_in_simplified_chinese_and_a_deploy_there(chromium, system, tiny_models):
    page = sign_in(chromium, system, locale="zh-CN", words=("用户名", "密码", "登录"))
    try:
        expect(page.get_by_role("heading", name="模型")).to_be_visible()
        for word in ("部署模型", "资源", "操作"):
            expect(page.get_by_text(word, exact=True).first).to_be_attached()
        shot(page, "zh-models")
        open_deploy(page, "本地路径", deploy_words=("部署模型",))
        page.get_by_text("高级", exact=True).click()
        for label in ("模型路径", "名称", "副本数", "后端", "后端版本", "GPU 选择器", "允许 CPU 卸载",
                      "允许跨工作节点分布式推理", "错误时自动重启"):
            expect(page.get_by_label(label, exact=True)).to_be_attached()
        for legend in ("模型类别", "调度类型", "放置策略", "工作节点选择器", "后端参数", "环境变量"):
            expect(page.get_by_text(legend, exact=True)).to_be_attached()
        page.get_by_label("模型路径").fill(str(tiny_models["chat"]))
        page.get_by_label("名称", exact=True).fill("page-zh")
        shot(page, "zh-deploy")
        page.get_by_role("button", name="保存").click()
        expect(model_row(page, "page-zh").locator(".summary")).to_contain_text("运行中", timeout=RUN_TIMEOUT)
        page.get_by_label("语言").select_option("en")
        expect(page.get_by_role("heading", name="Models")).to_be_visible()  # the switch, remembered
        page.goto(system.base_url + "/resources/")
        expect(page.get_by_role("heading", name="Resources")).to_be_visible()
    finally:
        page.context.close()
        delete_models(system, "page-zh")


def test_pages_need_an_admin_and_forms_need_their_csrf_token(system):
    anonymous = httpx.get(system.base_url + "/models/deploy/")
    assert anonymous.status_code == 302 and anonymous.headers["location"].startswith("/login/")
    forged = httpx.post(system.base_url + "/login/", data={"username": "admin", "password": "e2e-password"})
    assert forged.status_code == 403  # no CSRF token: refused before the password is even looked at
    assert Path(SHOTS).exists()


def test_the_dashboard_charts_usage_and_load_and_an_instance_page_says_why(page, system, deploy, inference_key):
    model = deploy("charted")
    [running] = system.wait_for_instances(model["id"], "running")
    gateway = httpx.Client(base_url=system.base_url, timeout=30,
                           headers={"Authorization": f"Bearer {inference_key['key']}"})
    for _ in range(3):
        assert gateway.post("/v1/chat/completions", json={"model": "charted", "max_tokens": 4, "messages": [
            {"role": "user", "content": "hi"}]}).status_code == 200

    row = page.locator('tr[data-model="charted"] td')

    def charted():  # the counts arrive with the gateway's next usage flush
        page.goto(system.base_url + "/dashboard/")
        return row.count() and row.nth(1).inner_text() == "3"

    wait_until(charted, 60, "the gateway's three requests on the dashboard", interval=1)
    expect(page.locator("figure.chart[data-series=requests] canvas")).to_have_count(1)
    expect(page.locator("figure.chart[data-series=cpu] canvas")).to_have_count(1)  # the worker's heartbeats
    expect(page.locator("figure.chart[data-series=requests] .u-legend")).to_contain_text("charted")
    shot(page, "dashboard")
    page.goto(system.base_url + "/")
    model_row(page, "charted").locator("button.toggle").click()
    page.get_by_role("link", name=running["name"]).click()
    expect(page.get_by_role("heading", name="Why here")).to_be_visible()
    expect(page.locator("section.why")).to_contain_text(f"Placed on {running['worker_name']} with score")
    expect(page.locator("ol.timeline li[data-cause=healthy]")).to_have_count(1)
    expect(page.locator("table.memory")).to_contain_text("Measured")
    shot(page, "instance")


def test_export_then_import_an_edited_file_from_the_models_page(page, system, tmp_path):
    with page.expect_download() as downloaded:
        page.get_by_role("link", name="Export").click()
    exported = Path(downloaded.value.path()).read_text(encoding="utf-8")
    assert exported.startswith("aimind_models: 1\n")
    edited = tmp_path / "models.yaml"
    edited.write_text("models:\n- name: imported-page\n  source: huggingface\n  huggingface_repo_id: acme/none\n"
                      "  huggingface_filename: none.gguf\n  replicas: 0\n", encoding="utf-8")
    page.locator("summary", has_text="Import").click()
    page.get_by_label(re.compile("^Models file")).set_input_files(str(edited))
    page.locator(".import-menu").get_by_role("button", name="Import").click()
    expect(page.locator(".messages li.success")).to_contain_text("created 1 (imported-page)")
    expect(model_row(page, "imported-page")).to_have_count(1)
    shot(page, "models-imported")
    with system.client() as c:
        [imported] = [m for m in c.get("/api/v1/models").json() if m["name"] == "imported-page"]
        c.delete(f"/api/v1/models/{imported['id']}")


def test_a_new_api_key_with_a_limit_is_shown_once_then_listed_and_revoked(page, system):
    page.get_by_role("link", name="API keys").click()
    page.get_by_role("link", name="New key").click()
    page.get_by_label("Name").fill("page-key")
    page.get_by_label("Gateway (/v1) only").check()
    page.get_by_label("Requests per minute").fill("30")
    shot(page, "key-new")
    page.get_by_role("button", name="Create key").click()
    expect(page.get_by_text("Copy it now: it is not shown again.")).to_be_visible()
    raw = page.get_by_label("API key").input_value()
    shot(page, "key-issued")
    gateway = httpx.Client(base_url=system.base_url, timeout=30, headers={"Authorization": f"Bearer {raw}"})
    assert gateway.get("/v1/models").status_code == 200
    page.get_by_role("link", name="Done").click()
    row = page.locator('tr[data-key="page-key"]')
    expect(row.locator("td.limits")).to_have_text("30 requests/min")
    expect(page.locator("#keys")).not_to_contain_text(raw)
    shot(page, "keys")
    row.get_by_role("button", name="Revoke").click()  # the dialog is accepted
    expect(row.locator(".key-state")).to_have_text("Revoked")
    wait_until(lambda: gateway.get("/v1/models").status_code == 401, 10, "the revoked key refused by the gateway")
