"""POST /api/v1/evaluations: the placement a deployment would get now, or the reasons, writing nothing."""

import pytest

from models_app.models import Model, ModelInstance
from workers_app.models import Worker

pytestmark = pytest.mark.django_db


def test_each_spec_gets_a_result_in_order(api, register, llama_8b, llama_70b):
    register("z-a", vram_gib=[24], ram_gib=32)
    response = api.post("/api/v1/evaluations", {"model_specs": [
        {"name": "small", "source": "local_path", "local_path": str(llama_8b)},
        {"name": "big", "source": "local_path", "local_path": str(llama_70b), "cpu_offloading": False},
    ]}, format="json")
    assert response.status_code == 200, response.data
    small, big = response.data["results"]
    assert small["compatible"] is True
    assert small["placement"]["worker_name"] == "z-a"
    assert small["placement"]["gpu_indexes"] == [0]
    assert small["placement"]["distributed_servers"] == []
    claim = small["placement"]["computed_resource_claim"]
    assert {"ram", "vram", "offload_layers", "total_layers", "tensor_split"} <= set(claim)
    assert isinstance(claim["ram"], int) and isinstance(claim["vram"]["0"], int)
    assert big == {"compatible": False, "placement": None, "message": big["message"],
                   "placement_explanation": big["placement_explanation"]}
    assert big["placement_explanation"]["chosen"] is None
    assert small["placement_explanation"]["chosen"]["worker_name"] == "z-a"
    assert "z-a: needs" in big["message"] and "largest free is 24.0 GiB; cpu_offloading is off" in big["message"]
    assert not Model.objects.exists() and not ModelInstance.objects.exists()


def test_evaluation_counts_what_is_already_placed(api, register, deploy, llama_8b):
    register("a", vram_gib=[8], ram_gib=8)
    deploy(llama_8b, cpu_offloading=False)
    result = api.post("/api/v1/evaluations", {"model_specs": [
        {"name": "again", "source": "local_path", "local_path": str(llama_8b), "cpu_offloading": False}]},
        format="json").data["results"][0]
    assert result["compatible"] is False
    assert "largest free is" in result["message"]


def test_invalid_spec_is_answered_not_raised(api, register):
    register("a")
    result = api.post("/api/v1/evaluations", {"model_specs": [{"name": "x", "source": "ftp"}]},
                      format="json").data["results"][0]
    assert result["compatible"] is False and "source" in result["message"]
    assert Worker.objects.count() == 1


def test_evaluations_need_an_admin():
    from rest_framework.test import APIClient

    assert APIClient().post("/api/v1/evaluations", {"model_specs": [{}]}, format="json").status_code == 401
