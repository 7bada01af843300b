"""Schemathesis against the API's own OpenAPI schema, in-process, with a fixed seed and a bounded number of
examples per operation, as an admin's key and as an admin's browser session: no 5xx, no hang, no answer that
breaks the schema."""

from __future__ import annotations

import json

import pytest
import schemathesis
from django.core import signals
from django.core.wsgi import get_wsgi_application
from django.db import close_old_connections
from drf_spectacular.generators import SchemaGenerator
from drf_spectacular.renderers import OpenApiJsonRenderer
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from gateway_app.models import ApiKey
from tests.fixtures.hubs import point_clients_at, start_both, stop_all

EXAMPLES = 8  # per operation: 29 operations × 8 × 2 ways of signing in

spec = json.loads(OpenApiJsonRenderer().render(SchemaGenerator().get_schema(request=None, public=True)))
schema = schemathesis.openapi.from_dict(spec)
schema.app = get_wsgi_application()


@pytest.fixture(autouse=True)
def keep_the_test_database_open():
    """As Django's test client does: a request served in-process must not close the test's connection."""
    signals.request_started.disconnect(close_old_connections)
    signals.request_finished.disconnect(close_old_connections)
    yield
    signals.request_started.connect(close_old_connections)
    signals.request_finished.connect(close_old_connections)


@pytest.fixture(scope="module")
def hubs():
    started = start_both()
    yield started
    stop_all(started)


@pytest.fixture(autouse=True)
def stand_in_hubs(hubs, monkeypatch):
    """The sources operations ask real (stand-in) hubs, as in production: a repo the fuzzer invents is a 404."""
    point_clients_at(hubs, monkeypatch)


@pytest.fixture
def credentials(request, admin_user, client):
    if request.param == "key":
        return {"headers": {"Authorization": f"Bearer {ApiKey.issue(admin_user, 'fuzz')[1]}"}}
    client.force_login(admin_user)
    return {"cookies": {"sessionid": client.cookies["sessionid"].value}}


@pytest.mark.django_db
@pytest.mark.parametrize("credentials", ["key", "session"], indirect=True)
@schema.parametrize()
@settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
def test_no_operation_fails_or_breaks_its_schema(case, credentials):
    response = case.call(headers=credentials.get("headers"), cookies=credentials.get("cookies"))
    case.validate_response(response, checks=[not_a_server_error, response_schema_conformance])
