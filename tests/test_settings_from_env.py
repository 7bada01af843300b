"""Settings from the environment reject bad values with a message naming the variable."""

import pytest
from django.core.exceptions import ImproperlyConfigured

from aimind.env import database_from_url, env_int


def test_non_integer_port_is_refused(monkeypatch):
    monkeypatch.setenv("AIMIND_PORT", "eighty")
    with pytest.raises(ImproperlyConfigured, match="AIMIND_PORT must be an integer"):
        env_int("AIMIND_PORT", 8000, minimum=1, maximum=65535)


def test_out_of_range_port_is_refused(monkeypatch):
    monkeypatch.setenv("AIMIND_PORT", "70000")
    with pytest.raises(ImproperlyConfigured, match="AIMIND_PORT"):
        env_int("AIMIND_PORT", 8000, minimum=1, maximum=65535)


def test_unset_port_uses_the_default(monkeypatch):
    monkeypatch.delenv("AIMIND_PORT", raising=False)
    assert env_int("AIMIND_PORT", 8000) == 8000


def test_postgres_url_is_parsed(tmp_path):
    db = database_from_url("postgres://u:p%40ss@db.example:5433/aimind", sqlite_path=tmp_path / "x")
    assert (db["ENGINE"], db["NAME"], db["USER"], db["PASSWORD"], db["HOST"], db["PORT"]) == (
        "django.db.backends.postgresql", "aimind", "u", "p@ss", "db.example", "5433")


def test_empty_url_means_sqlite_in_the_data_dir(tmp_path):
    assert database_from_url("", sqlite_path=tmp_path / "db.sqlite3")["NAME"] == str(tmp_path / "db.sqlite3")


def test_unknown_database_scheme_is_refused(tmp_path):
    with pytest.raises(ImproperlyConfigured, match="mysql"):
        database_from_url("mysql://x/y", sqlite_path=tmp_path / "x")


def test_tests_run_in_their_own_data_dir_and_database():
    import os

    from django.conf import settings

    from tests.environment import DATA_DIR

    assert str(settings.DATA_DIR) == DATA_DIR
    expected = "postgresql" if os.environ.get("AIMIND_TEST_DATABASE_URL") else "sqlite3"
    assert settings.DATABASES["default"]["ENGINE"].endswith(expected)
