import pytest

from gateway_app import limits, tables, usage
from tests.fixtures.redis_server import running_redis


@pytest.fixture(autouse=True)
def fresh_gateway_memory():
    """Each test starts with tables and counts of its own (the test database is rolled back under them)."""
    tables.TABLES.__init__()
    usage.METER.__init__()
    limits.LIMITER.__init__()
    yield
    tables.TABLES.__init__()
    usage.METER.__init__()
    limits.LIMITER.__init__()


@pytest.fixture
def redis_url(tmp_path, settings):
    with running_redis(tmp_path) as url:
        settings.REDIS_URL = url
        settings.GATEWAY_REFRESH_INTERVAL = 0.05
        yield url
