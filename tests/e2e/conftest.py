import pytest

from tests.e2e.system import start_system
from tests.fixtures.tiny_gguf import write_tiny_llama


def pytest_collection_modifyitems(items):
    for item in items:
        if "/e2e/" in str(item.fspath):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {
        "chat": write_tiny_llama(root / "tiny-chat.gguf"),
        "embed": write_tiny_llama(root / "tiny-embed.gguf", embedding=True, seed=1, name="tiny-embed"),
    }


@pytest.fixture(scope="session")
def system(tmp_path_factory):
    """One running aiMindServe shared by the end-to-end tests (starting one costs seconds)."""
    running = start_system(tmp_path_factory.mktemp("system"))
    yield running
    running.stop()
