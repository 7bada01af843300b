"""What the scheduler reads from a hub to estimate a GGUF model before anything is downloaded.

    .venv/bin/python bench/remote_estimate.py [--shapes 8b,70b] [--runs 3]

Writes sparse Llama-3-8B and -70B shaped Q4_K_M GGUF files (holes, not data), serves them through the stand-in
Hugging Face and ModelScope hubs (tests/fixtures/hubs.py) on loopback, and runs the scheduler's estimate for a
model deployed from each hub (`estimate_model`: the file listing, then the GGUF header over HTTP range requests).
Prints, per hub and shape: the file size, the body bytes the hub sent, the number of requests and the wall time
(median of --runs, each with the estimate caches cleared). Goal: ≤ 10 MB read for the 8B file.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("AIMIND_DATA_DIR", tempfile.mkdtemp(prefix="aimind-bench-"))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "aimind.settings")

import django  # noqa: E402

django.setup()

from models_app.choices import SourceChoices  # noqa: E402
from models_app.models import Model  # noqa: E402
from scheduler_app import estimate  # noqa: E402
from tests.fixtures.hubs import start_huggingface, start_modelscope  # noqa: E402
from tests.fixtures.sparse_gguf import LLAMA3_8B, LLAMA3_70B, write_sparse_llama  # noqa: E402

SHAPES = {"8b": ("Meta-Llama-3-8B-Q4_K_M.gguf", LLAMA3_8B), "70b": ("Meta-Llama-3-70B-Q4_K_M.gguf", LLAMA3_70B)}
REPO = "bench/Llama-3-GGUF"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="8b,70b")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    folder = pathlib.Path(tempfile.mkdtemp(prefix="aimind-remote-estimate-"))
    files = {}
    for shape in args.shapes.split(","):
        name, dims = SHAPES[shape]
        files[shape] = (name, write_sparse_llama(folder / name, **dims))
    hubs = {"huggingface": start_huggingface(), "modelscope": start_modelscope()}
    for hub in hubs.values():
        hub.add_repo(REPO, {name: path for name, path in files.values()})
    os.environ["HF_ENDPOINT"] = hubs["huggingface"].url
    os.environ["MODELSCOPE_ENDPOINT"] = hubs["modelscope"].url

    print(f"{'hub':<12} {'shape':<6} {'file GB':>8} {'read MB':>8} {'requests':>9} {'ms':>7}  claim (CPU only)")
    try:
        for hub_name, hub in hubs.items():
            for shape, (name, path) in files.items():
                model = (Model(name=shape, source=SourceChoices.HUGGINGFACE, huggingface_repo_id=REPO,
                               huggingface_filename=name) if hub_name == "huggingface" else
                         Model(name=shape, source=SourceChoices.MODELSCOPE, model_scope_model_id=REPO,
                               model_scope_file_path=name))
                times, served, requests = [], 0, 0
                for _ in range(args.runs):
                    estimate._remote_gguf_info.cache_clear()
                    before_bytes, before_requests = hub.bytes_served, len(hub.requests)
                    started = time.perf_counter()
                    est = estimate.estimate_model(model)
                    times.append(time.perf_counter() - started)
                    served, requests = hub.bytes_served - before_bytes, len(hub.requests) - before_requests
                ram = est.claim(offload_layers=0, gpu_count=0).ram
                print(f"{hub_name:<12} {shape:<6} {path.stat().st_size / 1e9:>8.2f} {served / 1e6:>8.2f} "
                      f"{requests:>9} {statistics.median(times) * 1000:>7.0f}  {ram / 2**30:.2f} GiB RAM")
    finally:
        for hub in hubs.values():
            hub.stop()


if __name__ == "__main__":
    main()
