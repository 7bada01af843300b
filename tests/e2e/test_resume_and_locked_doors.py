"""A deploy in progress when `up` is stopped resumes when it starts again; a running system keeps its doors shut:
oversized bodies refused before they are read, Redis behind a password, private files, no cross-origin socket."""

from __future__ import annotations

import os
import socket
import stat
import time
from pathlib import Path

import pytest
import redis
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from tests.e2e.system import fresh_cache, start_system, wait_until
from tests.fixtures.tiny_gguf import write_tiny_llama


def hub_env(hubs, tmp) -> dict[str, str]:
    return {"AIMIND_CACHE_DIR": str(fresh_cache(tmp)), "HF_ENDPOINT": hubs["huggingface"].url,
            "MODELSCOPE_ENDPOINT": hubs["modelscope"].url, "HF_HOME": str(tmp / "hf-home"), "HF_TOKEN": ""}


def test_a_deploy_cut_by_stopping_up_resumes_when_it_starts_again(tmp_path, hubs):
    weights = write_tiny_llama(tmp_path / "Resume-Q8_0.gguf", n_embd=256, n_ff=1024, seed=9, name="resume")
    hub = hubs["huggingface"]
    hub.add_repo("acme/Resume-GGUF", {"Resume-Q8_0.gguf": weights})
    hub.throttle_bytes_per_s = 1 << 20  # ~4 s for the whole file: stopped half-way through
    env = hub_env(hubs, tmp_path)
    first = start_system(tmp_path, worker_name="resume-worker", extra_env=env)
    try:
        with first.client() as c:
            model = c.post("/api/v1/models", json={"name": "resumed", "source": "huggingface", "replicas": 1,
                                                   "huggingface_repo_id": "acme/Resume-GGUF",
                                                   "huggingface_filename": "*Q8_0.gguf",
                                                   "backend_parameters": ["--ctx-size", "256"]}).json()
            [downloading] = wait_until(lambda: [i for i in c.get(f"/api/v1/models/{model['id']}/instances").json()
                                                if i["state"] == "downloading" and i["download_progress"] > 5] or None,
                                       60, "the download under way")
    finally:
        assert first.stop(keep_database=True) == 0
    second = start_system(tmp_path, worker_name="resume-worker", extra_env=env, again=first)
    try:
        hub.throttle_bytes_per_s = None
        [running] = second.wait_for_instances(model["id"], "running", timeout=60)
        assert running["id"] == downloading["id"]  # the same instance, carried on, not replaced
        with second.client() as c:
            causes = [e["cause"] for e in c.get(f"/api/v1/instances/{running['id']}/events").json()]
        assert causes[-4:] == ["worker_stopped", "download", "start", "healthy"], causes
    finally:
        second.stop()
        hub.throttle_bytes_per_s = None


def test_an_anonymous_body_is_refused_by_its_size_before_it_is_read(system):
    with socket.create_connection(("127.0.0.1", system.port), timeout=10) as raw:
        raw.sendall(b"POST /api/v1/models HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Content-Length: 3000000000\r\n\r\n")  # 3 GB announced, none sent
        answer = raw.recv(4096)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    with system.client() as c:  # with a credential the limit is AIMIND_MAX_REQUEST_BYTES (32 MiB)
        assert c.post("/api/v1/models", content=b"x" * (33 << 20),
                      headers={"Content-Type": "application/json"}).status_code == 413


def test_redis_wants_its_password_and_the_data_dir_is_private(system):
    url = (system.data_dir / "run" / "redis.url").read_text().strip()
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(port=port).ping()
    assert redis.Redis.from_url(url).ping()
    assert stat.S_IMODE(os.stat(system.data_dir).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(system.data_dir / "run" / "redis.url").st_mode) == 0o600


def test_a_socket_from_another_origin_is_refused_even_with_a_key(system):
    url = f"ws://127.0.0.1:{system.port}/ws/models"
    with pytest.raises(InvalidStatus):
        connect(url, additional_headers={"Authorization": f"Bearer {system.api_key}",
                                         "Origin": "http://127.0.0.1:1"}, open_timeout=5)
    with connect(url, additional_headers={"Authorization": f"Bearer {system.api_key}"}, open_timeout=5) as ws:
        ws.send('{"shown": {}}')  # no Origin (not a browser): judged by the key alone


def test_deleting_an_instance_stops_its_download(system, hubs, tmp_path):
    weights = write_tiny_llama(tmp_path / "Cancel-Q8_0.gguf", n_embd=256, n_ff=1024, seed=13, name="cancel")
    hub = hubs["huggingface"]
    hub.add_repo("acme/Cancel-GGUF", {"Cancel-Q8_0.gguf": weights})
    hub.throttle_bytes_per_s = 512 << 10  # ~8 s for the file
    repo_dir = Path(system.env["AIMIND_CACHE_DIR"]) / "models" / "huggingface" / "acme--Cancel-GGUF"

    def on_disk() -> int:
        return sum(p.stat().st_size for p in repo_dir.rglob("*") if p.is_file())

    try:
        with system.client() as c:
            model = c.post("/api/v1/models", json={"name": "cancelled", "source": "huggingface",
                                                   "huggingface_repo_id": "acme/Cancel-GGUF",
                                                   "huggingface_filename": "*Q8_0.gguf"}).json()
            wait_until(lambda: any(i["state"] == "downloading" and i["download_progress"] > 5
                                   for i in c.get(f"/api/v1/models/{model['id']}/instances").json()), 60,
                       "the download under way")
            assert c.delete(f"/api/v1/models/{model['id']}").status_code == 204
        time.sleep(2)  # the worker notices at its next progress report (every second)
        stopped_at = on_disk()
        time.sleep(2)
        assert on_disk() == stopped_at < weights.stat().st_size  # no byte more after the stop, and not finished
    finally:
        hub.throttle_bytes_per_s = None
