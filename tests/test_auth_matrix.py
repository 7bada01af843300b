"""Every door needs the right credential: each route of the URL conf × each kind of caller → the expected answer.
The routes come from the URL conf itself, so a route added without a rule here fails the first test."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.test import Client
from django.urls import URLPattern, URLResolver, get_resolver
from django.utils import timezone

from gateway_app.models import ApiKey
from models_app import actions
from models_app.models import ModelInstance
from tests.factories import make_worker

pytestmark = pytest.mark.django_db

# What kind of door each route is. api: the management API (an admin's key or session, with permissions);
# page: the product's pages (sign-in redirect); gateway: /v1 (any usable key); worker: the cluster token and that
# worker's own credential (its node agent's routes);
# public: needs nothing (sign in, the language switch); admin: Django's admin site; schema: the OpenAPI schema and
# its docs, for any admin (staff), permissions or not; metrics: the AIMIND_METRICS_TOKEN only (Prometheus).
RULES = {
    r"^login/$": "public", r"^logout/$": "public", r"^i18n/": "public", r"^admin/": "admin",
    r"^api/v1/gpus$": "api", r"^api/v1/evaluations$": "api-post", r"^api/v1/sources/<str:hub>/models$": "api",
    r"^api/v1/sources/<str:hub>/files$": "api", r"^api/schema/$": "schema", r"^api/docs/$": "schema",
    r"^v1/models$": "gateway", r"^v1/(?P<route>": "gateway-post",
    r"^$": "page", r"^models/deploy/$": "page", r"^models/evaluate/$": "page-post",
    r"^models/export/$": "page", r"^models/import/$": "page-post",
    r"^models/<int:pk>/edit/$": "page", r"^models/(?P<pk>": "page-post", r"^instances/<int:pk>/delete/$": "page-post",
    r"^instances/<int:pk>/logs/$": "page", r"^instances/<int:pk>/logs/download$": "page",
    r"^resources/$": "page", r"^resources/workers/<int:pk>/edit/$": "page", r"^instances/<int:pk>/$": "page",
    r"^instances/deleted/$": "page",
    r"^dashboard/$": "page", r"^metrics$": "metrics",
    r"^keys/$": "page", r"^keys/new/$": "page", r"^keys/<int:pk>/edit/$": "page",
    r"^keys/<int:pk>/revoke/$": "page-post",
    r"^api/v1/workers/<int:pk>/assignments$": "worker", r"^api/v1/workers/<int:pk>/reports$": "worker-post",
}
ROUTER_KINDS = {"models": "api", "instances": "api", "workers": "api", "keys": "api"}


def routes() -> list[str]:
    """Every route as `^prefix^pattern`: one string per URLPattern, the admin's and i18n's included once."""
    found = []

    def walk(patterns, prefix: str) -> None:
        for entry in patterns:
            text = prefix + str(entry.pattern).lstrip("^")
            if isinstance(entry, URLResolver) and not text.startswith(("admin/", "i18n/")):
                walk(entry.url_patterns, text)
            elif isinstance(entry, URLResolver | URLPattern):
                found.append("^" + text)

    walk(get_resolver().url_patterns, "")
    return found


def kind_of(route: str) -> str | None:
    exact = {pattern.rstrip("$"): kind for pattern, kind in RULES.items()}
    if route.rstrip("$") in exact:
        return exact[route.rstrip("$")]
    if route.startswith("^api/v1/") and route.split("/")[2] in ROUTER_KINDS:
        return ROUTER_KINDS[route.split("/")[2]]
    for pattern, kind in RULES.items():  # a rule without its `$` covers the routes under it
        if not pattern.endswith("$") and route.startswith(pattern):
            return kind
    return None


def test_every_route_has_a_rule():
    missing = [r for r in routes() if kind_of(r) is None]
    assert missing == [], f"routes without an auth rule in {__file__}: {missing}"


@pytest.fixture
def callers(admin_user):
    User = get_user_model()
    plain = User.objects.create_user("plain", password="pw")
    clerk = User.objects.create_user("clerk", password="pw", is_staff=True)  # staff, no permissions
    viewer = User.objects.create_user("viewer", password="pw", is_staff=True)
    viewer.user_permissions.add(*Permission.objects.filter(codename__startswith="view_"))
    keys = {
        "admin key": ApiKey.issue(admin_user, "admin")[1],
        "inference key": ApiKey.issue(admin_user, "inference", scope="inference")[1],
        "expired key": ApiKey.issue(admin_user, "expired", expires_at=timezone.now() - timedelta(seconds=1))[1],
        "non-staff key": ApiKey.issue(plain, "plain")[1],
        "no-permission key": ApiKey.issue(clerk, "clerk")[1],
        "viewer key": ApiKey.issue(viewer, "viewer")[1],
        "wrong key": "aimind-not-a-key",
        "cluster token": "test-cluster-token",
    }
    clients = {"anonymous": Client()}
    for name, key in keys.items():
        clients[name] = Client(HTTP_AUTHORIZATION=f"Bearer {key}")
    for name, user in (("admin session", admin_user), ("non-staff session", plain), ("no-permission session", clerk)):
        clients[name] = Client()
        clients[name].force_login(user)
    return clients


def concrete(route: str, ids: dict[str, int]) -> str:
    path = route.lstrip("^").rstrip("$")
    path = re.sub(r"\(\?P<action>([a-z]+)[^)]*\)", r"\1", path)
    path = re.sub(r"<int:pk>|\(\?P<pk>[^)]*\)", str(ids["pk"]), path)
    path = path.replace("<str:hub>", "huggingface").replace("(?P<route>", "chat/completions(")
    path = re.sub(r"\(\?P<\w+>[^)]*\)", str(ids["pk"]), path)
    path = re.sub(r"\(stop\|start\|delete\)|\([^)]*\)", "", path)
    return "/" + path.replace("/?", "").replace("\\.", ".").replace("^", "")


REFUSED = {401, 403}


@pytest.mark.parametrize("caller", ["anonymous", "wrong key", "expired key", "non-staff key", "no-permission key",
                                    "cluster token", "inference key", "non-staff session", "no-permission session"])
def test_no_management_door_opens_without_an_admins_permission(callers, caller, settings):
    settings.METRICS_TOKEN = "metrics-secret"
    worker = make_worker("w")
    actions.do_create_model(name="m", source="local_path", local_path="/m.gguf")
    ids = {"pk": ModelInstance.objects.first().pk if ModelInstance.objects.exists() else worker.pk}
    client = callers[caller]
    for route in routes():
        kind = kind_of(route)
        if kind in ("public", "gateway", "gateway-post") or "(?P<format>" in route:
            continue
        if kind == "schema" and caller.startswith("no-permission"):
            continue
        # a worker's own routes are judged for a worker that exists (for one that does not, the answer is 404)
        path = concrete(route, {"pk": worker.pk} if kind.startswith("worker") else ids)
        response = client.post(path, {}) if kind.endswith("-post") else client.get(path)
        if kind == "admin" and caller == "no-permission session":
            assert b"have permission to view or edit anything" in response.content  # Django's own admin index
        elif kind.startswith("page") or kind == "admin":
            assert response.status_code in {302, 403}, (caller, path, response.status_code)
            if response.status_code == 302:
                assert "login" in response["Location"], (caller, path, response["Location"])
        else:
            assert response.status_code in REFUSED, (caller, path, response.status_code)


def test_an_admin_passes_every_door(callers):
    make_worker("w")
    actions.do_create_model(name="m", source="local_path", local_path="/m.gguf")
    ids = {"pk": ModelInstance.objects.first().pk}
    for caller in ("admin key", "admin session"):
        for route in routes():
            kind = kind_of(route)
            if kind.endswith("-post") or kind in ("public", "gateway", "admin", "worker", "metrics") \
                    or "(?P<format>" in route:
                continue
            if kind == "page" and caller.endswith("key"):
                continue  # the pages are for a browser's session; a key signs nobody in
            response = callers[caller].get(concrete(route, ids))
            assert response.status_code not in REFUSED | {302}, (caller, route, response.status_code)


def test_a_viewer_reads_but_changes_nothing(callers):
    viewer = callers["viewer key"]
    assert viewer.get("/api/v1/models").status_code == 200
    assert viewer.post("/api/v1/models", {"name": "x", "source": "local_path", "local_path": "/x.gguf"},
                       content_type="application/json").status_code == 403
    assert viewer.post("/api/v1/keys", {"name": "mine"}, content_type="application/json").status_code == 403


def test_metrics_take_their_token_and_nothing_else(callers, settings):
    settings.METRICS_TOKEN = "metrics-secret"
    for caller in ("admin key", "admin session", "cluster token", "inference key"):
        assert callers[caller].get("/metrics").status_code == 401, caller
    assert Client(HTTP_AUTHORIZATION="Bearer metrics-secret").get("/metrics").status_code == 200


def test_gateway_takes_any_usable_key_and_nothing_else(callers):
    for caller, status in (("anonymous", 401), ("wrong key", 401), ("expired key", 401), ("cluster token", 401),
                           ("inference key", 200), ("admin key", 200)):
        assert callers[caller].get("/v1/models").status_code == status, caller


def test_a_revoked_key_stops_at_once(admin_user, api):
    issued = api.post("/api/v1/keys", {"name": "ci", "scope": "inference"}, format="json").json()
    client = Client(HTTP_AUTHORIZATION=f"Bearer {issued['key']}")
    assert client.get("/v1/models").status_code == 200
    assert api.delete(f"/api/v1/keys/{issued['id']}").status_code == 204
    assert client.get("/v1/models").status_code == 401
    listed = {k["name"]: k for k in api.get("/api/v1/keys").json()}
    assert listed["ci"]["revoked_at"] and "key" not in listed["ci"]


def test_a_workers_own_routes_open_to_its_own_credential_only(callers):
    register = Client(HTTP_AUTHORIZATION="Bearer test-cluster-token")
    one = register.post("/api/v1/workers", {"name": "one", "ip": "10.0.0.1"}, content_type="application/json").json()
    two = register.post("/api/v1/workers", {"name": "two", "ip": "10.0.0.2"}, content_type="application/json").json()
    assert len([r for r in routes() if kind_of(r).startswith("worker")]) == 2
    own = Client(HTTP_AUTHORIZATION="Bearer test-cluster-token", HTTP_X_WORKER_CREDENTIAL=one["credential"])
    others = Client(HTTP_AUTHORIZATION="Bearer test-cluster-token", HTTP_X_WORKER_CREDENTIAL=two["credential"])
    no_token = Client(HTTP_AUTHORIZATION="Bearer aimind-not-a-key", HTTP_X_WORKER_CREDENTIAL=one["credential"])
    assert own.get(f"/api/v1/workers/{one['id']}/assignments").json() == {"instances": []}
    report = {"event": "alive", "instances": []}
    assert own.post(f"/api/v1/workers/{one['id']}/reports", report, content_type="application/json").json() == {
        "applied": True, "instance": None}
    for client in (others, no_token, callers["admin key"], callers["admin session"], callers["cluster token"]):
        assert client.get(f"/api/v1/workers/{one['id']}/assignments").status_code in REFUSED
        assert client.post(f"/api/v1/workers/{one['id']}/reports", report,
                           content_type="application/json").status_code in REFUSED
