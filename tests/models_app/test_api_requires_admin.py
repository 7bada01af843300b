"""Every management route needs an admin: no key → 401, a non-admin's key → 403, from localhost too."""

import pytest
from django.contrib.auth import get_user_model
from rest_framework.test import APIClient

from gateway_app.models import ApiKey

pytestmark = pytest.mark.django_db


@pytest.mark.parametrize("path", ["/api/v1/models", "/api/v1/instances", "/api/v1/workers", "/api/v1/gpus"])
def test_anonymous_requests_are_refused(path):
    assert APIClient().get(path).status_code == 401


def test_wrong_key_is_refused():
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION="Bearer aimind-wrong")
    assert client.get("/api/v1/models").status_code == 401


def test_non_admin_key_is_forbidden():
    user = get_user_model().objects.create_user("bob", password="pw")
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {ApiKey.issue(user, 'bob')[1]}")
    assert client.get("/api/v1/models").status_code == 403


def test_admin_key_is_accepted(api):
    assert api.get("/api/v1/models").status_code == 200


def test_session_login_is_accepted(admin_user):
    client = APIClient()
    client.force_login(admin_user)
    assert client.get("/api/v1/models").status_code == 200


def test_openapi_schema_is_served(api):
    response = api.get("/api/schema/")
    assert response.status_code == 200
    assert b"/api/v1/models" in response.content
