import pytest
from rest_framework.test import APIClient

from models_app import actions
from models_app.models import ModelInstance
from scheduler_app.scheduler import pending_instance_ids, schedule_instances
from tests.factories import gpu_status
from tests.fixtures.sparse_gguf import LLAMA3_8B, LLAMA3_70B, write_sparse_llama


@pytest.fixture(scope="session")
def llama_8b(tmp_path_factory):
    """A Llama-3-8B-shaped Q4_K_M GGUF: real header and tensor infos, the data a hole (a few MB on disk)."""
    return write_sparse_llama(tmp_path_factory.mktemp("sparse") / "llama-3-8b-q4_k_m.gguf", **LLAMA3_8B)


@pytest.fixture(scope="session")
def llama_70b(tmp_path_factory):
    return write_sparse_llama(tmp_path_factory.mktemp("sparse") / "llama-3-70b-q4_k_m.gguf", **LLAMA3_70B)


@pytest.fixture
def register(db):
    """Register a worker the way a worker does: POST /api/v1/workers with the cluster token."""
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION="Bearer test-cluster-token")

    def register(name: str, vram_gib: list[float] = (), ram_gib: float = 64, labels=None, system_reserved=None,
                 backends=None):
        status = gpu_status(list(vram_gib), ram_gib)
        if backends is not None:
            status["backends"] = backends
        body = {"name": name, "ip": "10.0.0.9", "labels": labels or {}, "status": status}
        if system_reserved:
            body["system_reserved"] = system_reserved
        response = client.post("/api/v1/workers", body, format="json")
        assert response.status_code == 201, response.data
        return response.data

    return register


@pytest.fixture
def deploy(db):
    """Create a model and run one scheduler pass; returns its instances, freshly read."""
    def deploy(path, **fields):
        fields.setdefault("name", "m")
        model = actions.do_create_model(source="local_path", local_path=str(path), **fields)
        schedule_instances(pending_instance_ids())
        return list(ModelInstance.objects.filter(model=model).select_related("worker").order_by("id"))

    return deploy


def gib(n: float) -> int:
    return int(n * 1024**3)
