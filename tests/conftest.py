"""Shared fixtures. The environment itself is set by tests/environment.py, loaded before Django."""

import os

import pytest

from tests.environment import DATA_DIR

pytest_plugins = ["tests.factories"]


@pytest.fixture(scope="session")
def django_db_modify_db_settings(django_db_modify_db_settings_parallel_suffix):
    """On SQLite, the test database is a file (not pytest-django's in-memory default), so that other
    processes can open it too (tests/scheduler/test_concurrent_placement.py)."""
    from django.db import connections

    db = connections["default"].settings_dict
    if db["ENGINE"].endswith("sqlite3") and not db["TEST"].get("NAME"):
        db["TEST"]["NAME"] = os.path.join(DATA_DIR, "test-db.sqlite3")

