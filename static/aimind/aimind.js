// aiMindServe's pages: a little plain JavaScript on server-rendered HTML. Text from the server or a hub is always
// set as text (textContent), never parsed as HTML, except the fragments the server rendered and escaped itself.
"use strict";

(function () {
  const $ = (selector, root = document) => root.querySelector(selector);
  const $$ = (selector, root = document) => Array.from(root.querySelectorAll(selector));
  const csrf = () => (document.cookie.match(/(?:^|; )csrftoken=([^;]+)/) || [])[1] || "";

  function socket(path, onMessage, onState, hello) {
    const url = (location.protocol === "https:" ? "wss://" : "ws://") + location.host + path;
    let delay = 500;
    function open() {
      const ws = new WebSocket(url);
      ws.onopen = () => { delay = 500; if (hello) ws.send(JSON.stringify(hello())); onState && onState("open"); };
      ws.onmessage = (event) => onMessage(event.data);
      ws.onclose = (event) => {
        onState && onState("closed");
        if (event.code === 4401 || event.code === 4404) return;  // not allowed, or gone: do not knock again
        setTimeout(open, delay);
        delay = Math.min(delay * 2, 10000);
      };
    }
    open();
  }

  // Every page: the language switch submits itself; dangerous buttons ask first.
  function common() {
    $$("[data-autosubmit]").forEach((select) => select.addEventListener("change", () => select.form.submit()));
    document.addEventListener("submit", (event) => {
      const question = event.target.dataset.confirm;
      if (question && !window.confirm(question)) event.preventDefault();
    }, true);
    $$("[data-copy]").forEach((button) => button.addEventListener("click", () => {  // a new key's Copy button
      const field = document.getElementById(button.dataset.copy);
      field.select();
      if (navigator.clipboard) navigator.clipboard.writeText(field.value).catch(() => document.execCommand("copy"));
      else document.execCommand("copy");
    }));
    document.addEventListener("click", (event) => {  // a click elsewhere closes an open menu
      $$("details.menu[open]").forEach((menu) => { if (!menu.contains(event.target)) menu.open = false; });
    });
  }

  // Models: rows expand to their instances; the server pushes a model's re-rendered rows when anything changes.
  function modelsPage() {
    const table = $("#models");
    if (!table) return;
    const expanded = new Set(JSON.parse(sessionStorage.getItem("aimind-expanded") || "[]"));
    const remember = () => sessionStorage.setItem("aimind-expanded", JSON.stringify([...expanded]));

    function wire(body) {
      const id = body.dataset.modelId;
      const toggle = $(".toggle", body);
      const inner = $("tr.instances", body);
      const show = (open) => {
        inner.hidden = !open;
        toggle.setAttribute("aria-expanded", String(open));
        toggle.classList.toggle("open", open);
      };
      show(expanded.has(id));
      toggle.addEventListener("click", () => {
        const open = inner.hidden;
        open ? expanded.add(id) : expanded.delete(id);
        remember();
        show(open);
      });
    }

    $$("tbody.model", table).forEach(wire);
    const empty = $("tbody.empty", table);
    const waiting = new Map();  // rows that arrived while their ⋯ menu was open: put in once it closes

    function put(fresh) {
      const current = document.getElementById(fresh.id);
      if (current && current.querySelector("details.menu[open]")) {
        waiting.set(fresh.id, fresh);
        return;
      }
      waiting.delete(fresh.id);
      if (current) {
        current.replaceWith(fresh);
      } else {
        const later = $$("tbody.model", table).find((b) => b.dataset.name.localeCompare(fresh.dataset.name) > 0);
        table.insertBefore(fresh, later || empty);
      }
      wire(fresh);
    }

    setInterval(() => waiting.forEach((fresh) => put(fresh)), 500);
    socket(table.dataset.live, (data) => {
      const message = JSON.parse(data);
      if (message.type === "removed") {
        waiting.delete("model-" + message.id);
        const current = document.getElementById("model-" + message.id);
        if (current) current.remove();
      } else if (message.type === "model") {
        const holder = document.createElement("table");
        holder.innerHTML = message.html;  // rendered and escaped by the server's own template
        put(holder.querySelector("tbody.model"));
      }
      empty.hidden = $$("tbody.model", table).length > 0;
    }, (state) => table.classList.toggle("live", state === "open"),
    // What this page shows: the server sends whatever changed since (also after a reconnect).
    () => ({shown: Object.fromEntries($$("tbody.model", table).map((b) => [b.dataset.modelId, b.dataset.fingerprint]))}));
  }

  // Deploy and Edit: sources, hub search, files by quantization, rows, scheduling, the live fit line.
  function modelForm() {
    const form = $("#model-form");
    if (!form) return;
    const source = () => (form.querySelector("input[name=source]:checked") || form.querySelector("input[name=source]")).value;
    const isHub = () => source() !== "local_path";

    function showSource() {
      $$("[data-for]", form).forEach((section) => {
        const on = section.dataset.for.split(" ").includes(source());
        section.hidden = !on;
        $$("input, select", section).forEach((input) => { input.disabled = !on; });
      });
      $("#search").disabled = $("#gguf").disabled = $("#search-button").disabled = !isHub();
    }

    function showScheduling() {
      const manual = (form.querySelector("input[name=scheduling]:checked") || {}).value === "manual";
      $$("[data-scheduling]", form).forEach((block) => {
        const on = (block.dataset.scheduling === "manual") === manual;
        block.hidden = !on;
        $$("input, select", block).forEach((input) => { input.disabled = !on; });
      });
    }

    form.addEventListener("click", (event) => {
      const button = event.target.closest("button");
      if (!button) return;
      if (button.classList.contains("add-row")) {
        const last = $$(".kv", button.parentElement).pop();
        const row = last.cloneNode(true);
        $$("input", row).forEach((input) => { input.value = ""; });
        button.before(row);
        $("input", row).focus();
      } else if (button.classList.contains("remove-row")) {
        const rows = $$(".kv", button.closest("fieldset"));
        if (rows.length > 1) button.parentElement.remove();
        else $$("input", button.parentElement).forEach((input) => { input.value = ""; });
        evaluateSoon();
      }
    });

    async function getJSON(url) {
      const response = await fetch(url, {headers: {"Accept": "application/json"}, credentials: "same-origin"});
      const body = await response.json().catch(() => ({}));
      if (!response.ok) throw new Error(body.detail || response.statusText);
      return body;
    }

    const results = $("#results");
    const files = $("#files");
    const note = (element, text) => { element.replaceChildren(); const p = document.createElement("p"); p.className = "muted"; p.textContent = text; element.append(p); };
    const number = new Intl.NumberFormat(document.documentElement.lang);
    const size = (bytes) => { let v = bytes, u = 0; const units = ["B", "KB", "MB", "GB", "TB"]; while (v >= 1024 && u < 4) { v /= 1024; u++; } return number.format(Math.round(v * 10) / 10) + " " + units[u]; };

    async function search() {
      note(results, "…");
      const params = new URLSearchParams({search: $("#search").value, gguf: $("#gguf").checked ? "true" : "false", limit: "30"});
      try {
        const body = await getJSON(form.dataset.sourcesApi + source() + "/models?" + params);
        results.replaceChildren();
        if (!body.results.length) note(results, form.dataset.none || "—");
        body.results.forEach((repo) => {
          const li = document.createElement("li");
          const pick = document.createElement("button");
          pick.type = "button";
          pick.className = "repo";
          pick.textContent = repo.id;
          pick.addEventListener("click", () => showFiles(repo.id, pick));
          const facts = document.createElement("span");
          facts.className = "muted small";
          facts.textContent = ` ↓ ${number.format(repo.downloads)} ♥ ${number.format(repo.likes)}`;
          li.append(pick, facts);
          results.append(li);
        });
      } catch (error) {
        note(results, error.message);
      }
    }

    function repoField() { return source() === "huggingface" ? $("#huggingface_repo_id") : $("#model_scope_model_id"); }
    function fileField() { return source() === "huggingface" ? $("#huggingface_filename") : $("#model_scope_file_path"); }

    async function showFiles(repo, button) {
      $$(".repo", results).forEach((b) => b.classList.toggle("picked", b === button));
      repoField().value = repo;
      fileField().value = "";
      note(files, "…");
      try {
        const body = await getJSON(form.dataset.sourcesApi + source() + "/files?" + new URLSearchParams({repo}));
        files.replaceChildren();
        const models = body.groups.gguf.filter((g) => !g.mmproj);
        if (!models.length) {
          note(files, body.files.length ? "config.json / safetensors" : "—");
          fillName(repo, "");
          evaluateSoon();
          return;
        }
        models.forEach((group, n) => {
          const label = document.createElement("label");
          label.className = "file";
          const radio = document.createElement("input");
          radio.type = "radio";
          radio.name = "file-choice";
          radio.value = group.path;  // a split set's first part brings the others along
          radio.addEventListener("change", () => { fileField().value = radio.value; fillName(repo, group.quantization || ""); evaluateSoon(); });
          const quant = document.createElement("strong");
          quant.textContent = group.quantization || "GGUF";
          const facts = document.createElement("span");
          facts.className = "muted small";
          facts.textContent = ` ${group.path}${group.split ? ` (${group.parts})` : ""} · ${size(group.size)}`;
          label.append(radio, " ", quant, facts);
          files.append(label);
        });
      } catch (error) {
        note(files, error.message);
      }
    }

    const name = $("#name");
    let nameWasFilled = !name.value;
    name.addEventListener("input", () => { nameWasFilled = false; });
    function fillName(repo, quantization) {
      if (!nameWasFilled && name.value) return;
      name.value = (repo.split("/").pop() + (quantization ? "-" + quantization : "")).toLowerCase().replace(/-gguf(?=-|$)/, "");
      nameWasFilled = true;
    }

    // The live fit line: the scheduler's answer for the form as it is, after a pause in typing.
    const fit = $("#fit");
    let timer = null;
    let asked = 0;
    function evaluateSoon() { clearTimeout(timer); timer = setTimeout(evaluate, 400); }
    async function evaluate() {
      const ticket = ++asked;
      const data = new FormData(form);
      try {
        const response = await fetch(form.dataset.evaluate, {method: "POST", body: data, credentials: "same-origin",
                                                              headers: {"X-CSRFToken": csrf()}});
        const body = await response.json();
        if (ticket !== asked) return;  // a newer question is on its way
        fit.textContent = body.summary;
        fit.className = "fit " + (body.compatible ? "fits" : "misfit");
      } catch (error) {
        fit.textContent = "";
      }
    }

    $("#search-button").addEventListener("click", search);
    $("#search").addEventListener("keydown", (event) => { if (event.key === "Enter") { event.preventDefault(); search(); } });
    $$("input[name=source]", form).forEach((radio) => radio.addEventListener("change", () => {
      showSource(); note(results, ""); note(files, ""); evaluateSoon();
    }));
    $$("input[name=scheduling]", form).forEach((radio) => radio.addEventListener("change", () => { showScheduling(); evaluateSoon(); }));
    form.addEventListener("input", evaluateSoon);
    form.addEventListener("change", evaluateSoon);
    showSource();
    showScheduling();
    evaluateSoon();
  }

  // Logs: the backlog, then each new line, following the end unless the reader scrolled up.
  function logsPage() {
    const log = $("#log");
    if (!log || !log.dataset.live) return;  // without data-live: an earlier attempt's kept log, shown as it was
    const follow = $("#follow");
    const status = $("#log-status");
    socket(log.dataset.live, (line) => {
      log.append(document.createTextNode(line + "\n"));
      if (follow.checked) log.scrollTop = log.scrollHeight;
    }, (state) => {
      if (state === "open") log.replaceChildren();  // each connection starts with the backlog again
      status.textContent = state === "open" ? status.dataset.live : status.dataset.reconnecting;
    });
    log.addEventListener("scroll", () => {
      follow.checked = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
    });
  }

  // Labels (and every page with rows): add and remove rows of key and value.
  function rowsOutsideTheModelForm() {
    document.addEventListener("click", (event) => {
      const button = event.target.closest("button");
      if (!button || button.closest("#model-form")) return;
      if (button.classList.contains("add-row")) {
        const row = $$(".kv", button.parentElement).pop().cloneNode(true);
        $$("input", row).forEach((input) => { input.value = ""; });
        button.before(row);
      } else if (button.classList.contains("remove-row")) {
        const rows = $$(".kv", button.closest("fieldset"));
        if (rows.length > 1) button.parentElement.remove();
        else $$("input", button.parentElement).forEach((input) => { input.value = ""; });
      }
    });
  }

  document.addEventListener("DOMContentLoaded", () => {
    common();
    modelsPage();
    modelForm();
    logsPage();
    rowsOutsideTheModelForm();
  });
})();
