"""Test settings: a throw-away data dir; PostgreSQL when AIMIND_TEST_DATABASE_URL is set (see Makefile)."""

import os
import tempfile

_data_dir = tempfile.mkdtemp(prefix="aimind-test-data-")
os.environ["AIMIND_DATA_DIR"] = _data_dir
os.environ.setdefault("AIMIND_TOKEN", "test-cluster-token")
if os.environ.get("AIMIND_TEST_DATABASE_URL"):
    os.environ["DATABASE_URL"] = os.environ["AIMIND_TEST_DATABASE_URL"]
else:
    os.environ.pop("DATABASE_URL", None)

pytest_plugins = ["tests.factories"]
