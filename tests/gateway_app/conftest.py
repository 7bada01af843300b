import pytest

from gateway_app import tables, usage


@pytest.fixture(autouse=True)
def fresh_gateway_memory():
    """Each test starts with tables and counts of its own (the test database is rolled back under them)."""
    tables.TABLES.__init__()
    usage.METER.__init__()
    yield
    tables.TABLES.__init__()
    usage.METER.__init__()
