"""The pages' weight and server time with a full cluster, and Save → Running as a person sees it in Chromium.

    .venv/bin/python bench/pages.py [--rounds 5]

Part 1 runs the views in-process against a fresh SQLite database holding 100 models × 3 instances and 50 workers
(2 GPUs each); part 2 starts the product, deploys the tiny model through the Deploy page and times until its row
says Running on the Models page (live, no reload).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ["AIMIND_DATA_DIR"] = tempfile.mkdtemp(prefix="aimind-bench-pages-")
os.environ.pop("DATABASE_URL", None)
os.environ.pop("REDIS_URL", None)
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "aimind.settings")

import django  # noqa: E402

django.setup()

from django.core.management import call_command  # noqa: E402
from django.db import connection  # noqa: E402
from django.test import Client  # noqa: E402
from django.test.utils import CaptureQueriesContext  # noqa: E402


def populate() -> None:
    from django.contrib.auth import get_user_model

    from models_app.models import Model, ModelInstance
    from tests.factories import gpu_status
    from workers_app.models import Worker

    get_user_model().objects.create_superuser("bench", password="bench")
    workers = Worker.objects.bulk_create(Worker(name=f"w{n:02d}", ip=f"10.0.0.{n}", status=gpu_status([80, 80], 512),
                                                labels={"zone": "ab"[n % 2]}) for n in range(50))
    models = Model.objects.bulk_create(Model(name=f"model-{n:03d}", source="local_path", local_path=f"/m/{n}.gguf",
                                             replicas=3, categories=["llm"]) for n in range(100))
    states = ["running", "running", "downloading"]
    ModelInstance.objects.bulk_create(
        ModelInstance(model=m, name=f"{m.name}-{k}", worker=workers[(i * 3 + k) % 50], state=states[k], port=40000 + k,
                      gpu_indexes=[k % 2], download_progress=37.5,
                      computed_resource_claim={"ram": 1 << 30, "vram": {str(k % 2): 8 << 30}})
        for i, m in enumerate(models) for k in range(3))


def server_times(rounds: int) -> list[tuple[str, float, int, int, int]]:
    client = Client()
    client.login(username="bench", password="bench")
    static = sum(p.stat().st_size for p in (REPO / "static" / "aimind").iterdir())
    rows = []
    for path in ("/", "/resources/", "/models/deploy/"):
        client.get(path)  # warm: templates compiled, translations loaded
        times = []
        for _ in range(rounds):
            with CaptureQueriesContext(connection) as queries:
                began = time.perf_counter()
                response = client.get(path)
                times.append(time.perf_counter() - began)
        rows.append((path, statistics.median(times) * 1000, len(response.content), static, len(queries)))
    return rows


def save_to_running() -> float:
    from playwright.sync_api import expect, sync_playwright

    from tests.e2e.system import start_system
    from tests.fixtures.tiny_gguf import write_tiny_llama

    with tempfile.TemporaryDirectory(prefix="aimind-bench-") as tmp:
        model = write_tiny_llama(Path(tmp) / "tiny.gguf")
        system = start_system(Path(tmp))
        try:
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path="/usr/bin/chromium",
                                                     args=["--no-sandbox", "--disable-gpu"])
                page = browser.new_page()
                page.goto(system.base_url + "/login/")
                page.get_by_label("Username").fill("admin")
                page.get_by_label("Password").fill("e2e-password")
                page.get_by_role("button", name="Sign in").click()
                page.goto(system.base_url + "/models/deploy/?source=local_path")
                page.get_by_label("Model path").fill(str(model))
                page.get_by_label("Name").fill("bench-tiny")
                began = time.perf_counter()
                page.get_by_role("button", name="Save").click()
                row = page.locator("tbody.model[data-name=bench-tiny] .summary")
                expect(row).to_contain_text("Running", timeout=60_000)
                elapsed = time.perf_counter() - began
                browser.close()
        finally:
            system.stop()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    call_command("migrate", verbosity=0)
    populate()
    print(f"\n{'page (100 models × 3 instances, 50 workers)':<46} {'server ms':>10} {'HTML KB':>9} "
          f"{'CSS+JS KB':>10} {'queries':>8}")
    for path, ms, html, static, queries in server_times(args.rounds):
        print(f"{path:<46} {ms:>10.1f} {html / 1024:>9.1f} {static / 1024:>10.1f} {queries:>8}")
    print(f"\nSave → Running seen on the Models page (tiny model, Chromium): {save_to_running():.2f} s")


if __name__ == "__main__":
    main()
