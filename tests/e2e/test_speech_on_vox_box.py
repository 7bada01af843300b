"""Speech models run on vox-box, end to end on this CPU: vox-box is installed on first use, a real whisper-base
transcribes Piper's spoken English through /v1/audio/transcriptions, a tiny random Bark answers /v1/audio/speech
with audio, and vox-box's refusals (HTTP 200 with a status inside) reach the client as real 4xx in OpenAI's shape."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import openai
import psutil
import pytest

from tests.fixtures.speech import spoken, whisper_base

# The first test waits for the first install (9 GB on a fresh machine): longer than the suite's 600 s per test.
pytestmark = pytest.mark.timeout(2400)
SENTENCE = "The quick brown fox jumps over the lazy dog."
FIRST_INSTALL_TIMEOUT = 1800  # a fresh machine downloads and installs about 9 GB (7 minutes here)
TINY_BARK = Path(__file__).resolve().parents[1] / "fixtures" / "tiny_bark.py"


def deploy(system, name: str, path: Path, timeout: float) -> dict:
    return system.deploy_and_watch({"name": name, "source": "local_path", "local_path": str(path)}, timeout)


@pytest.fixture(scope="module")
def whisper(system):
    deployed = deploy(system, "whisper", whisper_base(), FIRST_INSTALL_TIMEOUT)
    yield deployed
    with system.client() as c:
        c.delete(f"/api/v1/models/{deployed['model']['id']}")


@pytest.fixture
def client(system):
    return openai.OpenAI(base_url=f"{system.base_url}/v1", api_key=system.api_key, max_retries=0, timeout=300)


def test_whisper_directory_is_given_to_vox_box_which_is_installed_on_first_use(system, whisper):
    instance = whisper["instance"]
    assert (instance["backend"], instance["backend_version"]) == ("vox-box", "0.0.21")
    model = whisper["model"]
    assert model["backend"] == "vox-box" and model["categories"] == ["speech_to_text"]
    cache = (Path(system.env["AIMIND_CACHE_DIR"]) / "backends").resolve() / "vox-box" / "0.0.21"
    assert (cache / ".installed.json").is_file()
    assert str(cache) in " ".join(psutil.Process(instance["pid"]).cmdline())
    if (cache / ".installed.json").stat().st_mtime > whisper["posted_at"]:  # installed for this deployment
        assert any(s.startswith("initializing: installing vox-box 0.0.21") for s in whisper["seen"]), whisper["seen"]


def test_transcription_returns_the_spoken_words(client, whisper, tmp_path):
    audio = spoken(SENTENCE, tmp_path / "fox.wav")
    with open(audio, "rb") as f:
        text = client.audio.transcriptions.create(model="whisper", file=f).text
    assert re.sub(r"[^a-z ]", "", text.lower()).split() == ["the", "quick", "brown", "fox", "jumps", "over", "the",
                                                             "lazy", "dog"]


def test_vox_box_refusals_reach_the_client_as_real_statuses(client, whisper, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("this is not audio")
    with open(notes, "rb") as f, pytest.raises(openai.BadRequestError) as caught:
        client.audio.transcriptions.create(model="whisper", file=("notes.txt", f, "text/plain"))
    assert caught.value.status_code == 400
    assert caught.value.body["message"] == "Unsupported file format: text/plain"
    with pytest.raises(openai.BadRequestError) as refused:
        client.audio.speech.create(model="whisper", input="hello", voice="alloy")
    assert refused.value.body["message"] == "Model instance does not support speech API"


def test_text_to_speech_answers_with_audio(system, client, whisper, tmp_path):
    python = (Path(system.env["AIMIND_CACHE_DIR"]) / "backends").resolve() / "vox-box" / "0.0.21" / "bin" / "python"
    bark_dir = tmp_path / "tiny-bark"
    subprocess.run([str(python), str(TINY_BARK), str(bark_dir)], check=True, timeout=600, capture_output=True)
    deployed = deploy(system, "tiny-bark", bark_dir, 300)
    try:
        assert deployed["instance"]["backend"] == "vox-box"
        speech = client.audio.speech.create(model="tiny-bark", input="hello world", voice="v2/en_speaker_6",
                                            response_format="wav")
        audio = speech.read()
        assert audio[:4] == b"RIFF" and audio[8:12] == b"WAVE" and len(audio) > 10_000, audio[:64]
    finally:
        with system.client() as c:
            c.delete(f"/api/v1/models/{deployed['model']['id']}")
