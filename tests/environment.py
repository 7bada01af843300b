"""Loaded with `-p tests.environment` (pyproject addopts) before pytest-django imports the settings:
the tests' environment. A conftest would run too late for settings read at import time."""

import os
import tempfile

DATA_DIR = tempfile.mkdtemp(prefix="aimind-test-data-")
os.environ["AIMIND_DATA_DIR"] = DATA_DIR
os.environ.setdefault("AIMIND_TOKEN", "test-cluster-token")
os.environ.pop("REDIS_URL", None)  # never a Redis the tests did not start
if os.environ.get("AIMIND_TEST_DATABASE_URL"):
    os.environ["DATABASE_URL"] = os.environ["AIMIND_TEST_DATABASE_URL"]
else:
    os.environ.pop("DATABASE_URL", None)
