"""Labels set by an operator (pages, admin, API) survive the worker's restart; its command-line labels are added."""

import pytest
from rest_framework.test import APIClient

from tests.factories import cpu_status
from workers_app import actions
from workers_app.models import Worker

pytestmark = pytest.mark.django_db


CREDENTIAL: dict[str, str] = {}


def register(labels: dict) -> Worker:
    """As the worker's agent does: its own credential from the first registration on every later one."""
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION="Bearer test-cluster-token", HTTP_X_WORKER_CREDENTIAL=CREDENTIAL.get("w", ""))
    response = client.post("/api/v1/workers", {"name": "w", "labels": labels, "status": cpu_status()}, format="json")
    assert response.status_code == 201, response.content
    if "credential" in response.json():
        CREDENTIAL["w"] = response.json()["credential"]
    return Worker.objects.get(name="w")


@pytest.fixture(autouse=True)
def fresh_credentials():
    CREDENTIAL.clear()


def test_operator_labels_survive_reregistration_and_reported_ones_are_added(api):
    worker = register({"zone": "a", "rack": "1"})
    assert api.patch(f"/api/v1/workers/{worker.pk}", {"labels": {"zone": "b", "rack": "1", "team": "blue"}},
                     format="json").status_code == 200
    again = register({"zone": "a", "rack": "2", "disk": "ssd"})
    # team: the operator's; zone: the operator changed it; rack: still the worker's own, so it follows; disk: new.
    assert again.labels == {"zone": "b", "rack": "2", "team": "blue", "disk": "ssd"}


def test_a_label_dropped_from_the_command_line_goes_unless_an_operator_changed_it():
    register({"zone": "a", "rack": "1"})
    worker = Worker.objects.get(name="w")
    actions.do_update_worker(worker, {"labels": {"zone": "b", "rack": "1"}})
    assert register({}).labels == {"zone": "b"}


def test_labels_edited_on_the_resources_page_survive_too():
    worker = register({})
    actions.do_update_worker(worker, {"labels": {"gpu": "h100"}})
    assert register({}).labels == {"gpu": "h100"}
