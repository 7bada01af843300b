"""`system_reserved`: memory a worker keeps for itself, set from the API, the Resources page and the worker's command
line, and never booked by the scheduler."""

import pytest
from django.core.management import CommandError, call_command
from django.test import Client

from scheduler_app.scheduler import build_pool
from tests.factories import GIB, cpu_status, gpu_status, make_worker
from workers_app.models import Worker
from workers_app.sizes import format_size, parse_size

pytestmark = pytest.mark.django_db


@pytest.mark.parametrize(("text", "size"), [("4GiB", 4 * GIB), ("512MiB", 512 * 1024**2), ("1.5G", int(1.5 * GIB)),
                                             ("2048", 2048), (" 1 TiB ", 1024**4)])
def test_sizes_read_as_people_write_them(text, size):
    assert parse_size(text) == size
    assert parse_size(format_size(size)) == size


def test_a_size_that_is_not_one_is_named():
    with pytest.raises(ValueError, match="'lots' is not a size"):
        parse_size("lots")


def test_the_api_sets_the_reservation_and_the_scheduler_counts_it(api):
    worker = make_worker("w", status=gpu_status([24], ram_gib=64))
    response = api.patch(f"/api/v1/workers/{worker.pk}", {"system_reserved": {"ram": 16 * GIB, "vram": 4 * GIB}},
                         format="json")
    assert response.status_code == 200, response.content
    assert response.json()["system_reserved"] == {"ram": 16 * GIB, "vram": 4 * GIB}
    pool = build_pool([Worker.objects.get(pk=worker.pk)])[worker.pk]
    assert pool.ram_total == 48 * GIB and pool.gpu_total == {0: 20 * GIB}


def test_the_api_refuses_an_unknown_key_or_a_negative_size(api):
    worker = make_worker("w")
    unknown = api.patch(f"/api/v1/workers/{worker.pk}", {"system_reserved": {"disk": 1}}, format="json")
    assert unknown.status_code == 400 and "unknown key 'disk'" in str(unknown.json()["system_reserved"])
    negative = api.patch(f"/api/v1/workers/{worker.pk}", {"system_reserved": {"ram": -1}}, format="json")
    assert negative.status_code == 400 and "system_reserved" in negative.json()


@pytest.fixture
def page(admin_user):
    client = Client()
    client.force_login(admin_user)
    return client


def test_the_resources_page_edits_the_reservation(page):
    worker = make_worker("w", status=cpu_status(32), labels={"zone": "a"})
    form = page.get(f"/resources/workers/{worker.pk}/edit/").content.decode()
    assert 'name="reserved_ram" value="0"' in form
    saved = page.post(f"/resources/workers/{worker.pk}/edit/", {
        "label_key": ["zone"], "label_value": ["a"], "reserved_ram": "4GiB", "reserved_vram": "512MiB"})
    assert saved.status_code == 302
    worker.refresh_from_db()
    assert worker.system_reserved == {"ram": 4 * GIB, "vram": 512 * 1024**2} and worker.labels == {"zone": "a"}
    assert 'name="reserved_ram" value="4GiB"' in page.get(f"/resources/workers/{worker.pk}/edit/").content.decode()
    listing = page.get("/resources/", HTTP_ACCEPT_LANGUAGE="zh-CN").content.decode()
    assert "预留 4.0" in listing


def test_the_page_names_a_bad_size_and_keeps_what_was_typed(page):
    worker = make_worker("w")
    answer = page.post(f"/resources/workers/{worker.pk}/edit/", {"reserved_ram": "lots", "reserved_vram": "1GiB"})
    assert answer.status_code == 400
    text = answer.content.decode()
    assert "Reserved RAM: &#x27;lots&#x27; is not a size" in text and 'value="lots"' in text
    worker.refresh_from_db()
    assert worker.system_reserved == {}


def test_the_worker_command_refuses_a_bad_reservation(monkeypatch, settings):
    settings.SERVER_URL = "http://127.0.0.1:9"
    with pytest.raises(CommandError, match="--reserved-ram/--reserved-vram: 'much' is not a size"):
        call_command("worker", "--reserved-ram", "much")


def test_a_server_for_other_hosts_refuses_a_redis_without_a_password(settings):
    from aimind.management.commands.server import Command

    settings.HOST, settings.REDIS_URL = "0.0.0.0", "redis://10.0.0.5:6379/0"
    with pytest.raises(CommandError, match="REDIS_URL has no password, and AIMIND_HOST=0.0.0.0"):
        Command().start_children(None, {})
