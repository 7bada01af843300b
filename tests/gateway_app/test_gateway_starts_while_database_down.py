"""A web process that starts while the database is down serves from the copy of the tables the last load left on
disk (a restart during an outage must not turn every /v1 request into a 500); without a copy it cannot serve."""

import stat

import pytest
from asgiref.sync import async_to_sync, sync_to_async
from django.db import OperationalError

from gateway_app import tables
from gateway_app.models import ApiKey
from tests.gateway_app.fake_backend import APP, CHAT, FakeBackend, call, deploy

pytestmark = pytest.mark.django_db


@pytest.fixture
def saved_copy(settings, tmp_path):
    settings.DATA_DIR = tmp_path
    tables.saved_tables.__init__()
    yield tables.saved_tables.path
    tables.saved_tables.__init__()


def database_down(monkeypatch):
    def refuse():
        raise OperationalError("connection to server at 127.0.0.1 failed: Connection refused")

    monkeypatch.setattr(tables, "read_rows", refuse)  # a unit test: the database's failure, as Django raises it


def test_a_restarted_web_process_serves_from_the_saved_tables_while_the_database_is_down(admin_user, saved_copy,
                                                                                         monkeypatch):
    key = ApiKey.issue(admin_user, "k")[1]

    @async_to_sync
    async def run():
        backend = FakeBackend("kept")
        port = await backend.start()
        try:
            await sync_to_async(deploy)("tiny", [port])
            assert (await call(APP, "POST", "/v1/chat/completions", key=key, json_body=CHAT))["status"] == 200
            tables.TABLES.__init__()  # the process restarts ...
            database_down(monkeypatch)  # ... while the database is down
            return await call(APP, "POST", "/v1/chat/completions", key=key, json_body=CHAT)
        finally:
            await backend.stop()

    assert run()["status"] == 200
    assert stat.S_IMODE(saved_copy.stat().st_mode) == 0o600  # it holds the backends' secrets


def test_without_a_saved_copy_the_first_load_fails_as_before(admin_user, saved_copy, monkeypatch):
    key = ApiKey.issue(admin_user, "k")[1]
    database_down(monkeypatch)
    assert not saved_copy.exists()
    answer = async_to_sync(call)(APP, "GET", "/v1/models", key=key)
    assert answer["status"] == 500
