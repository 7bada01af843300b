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
# The hub clients keep caches and tokens under these; never the user's own (and never a real HF_TOKEN).
os.environ["HF_HOME"] = os.path.join(DATA_DIR, "hf-home")
os.environ["MODELSCOPE_CACHE"] = os.path.join(DATA_DIR, "modelscope-cache")
os.environ.pop("HF_TOKEN", None)
