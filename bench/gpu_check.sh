#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: does aiMindServe see it (NVML), build llama-box with CUDA for its architecture,
# offload a model to it, and launch vLLM on it? Prints the figures; each step says why when it cannot run.
#
#     bash bench/gpu_check.sh            # from the repo root; uses .venv/bin/python, else python3
#
# The CUDA build needs nvcc (the system's, or PyPI's CUDA 13.0 wheels, installed on demand) and the
# llama-cpp-python sdist (pip, or AIMIND_CACHE_DIR already holding the build); vLLM needs pip to reach an index.
# Steps 2 and 3 report a CUDA build only: a CPU build or a llama-box on PATH is not what this checks.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export PYTHONUNBUFFERED=1
work=$(mktemp -d)
trap 'pkill -P $$ 2>/dev/null; rm -rf "$work"' EXIT
say() { printf '\n== %s\n' "$*"; }

say "1. NVML detection"
nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv 2>&1 | head -5
"$PY" - <<'EOF' || exit 1
import json
from workers_app import inventory
gpus = inventory.nvidia_gpus()
node = inventory.node_info(gpus)
print(json.dumps({"gpus": gpus, "nvcc": node.cuda_compiler, "backends": inventory.backend_capabilities(node)},
                 indent=1))
if not gpus:
    raise SystemExit("no NVIDIA GPU found by NVML: nothing more to check here")
EOF

say "2. llama-box CUDA build"
started=$SECONDS
"$PY" - <<'EOF' 2>&1 | grep -v '^\[' | tail -15
from workers_app import inventory
from workers_app.backends import llama_box_install as lb
node = inventory.node_info()
variant = lb.variant_for(node.gpus, node.cuda_compiler)
if not variant.startswith("cuda"):
    raise SystemExit(f"no CUDA build for this node (variant {variant}): skipped")
print("variant:", variant, "compiler:", node.cuda_compiler, "cmake flags:", " ".join(lb.cmake_flags(variant, lb.find_nvcc())))
binaries = lb.ensure(lb.LLAMA_CPP_PYTHON_VERSION, variant)
print("server:", binaries.server)
EOF
echo "build (or cache lookup) took $((SECONDS - started)) s"

say "3. a tiny model fully offloaded"
"$PY" - "$work" <<'EOF'
import subprocess, sys, time
from pathlib import Path
import httpx
from tests.fixtures.tiny_gguf import write_tiny_llama
from workers_app import inventory
from workers_app.backends import llama_box_install as lb
node = inventory.node_info()
variant = lb.variant_for(node.gpus, node.cuda_compiler)
binaries = lb.find(lb.LLAMA_CPP_PYTHON_VERSION, variant) if variant.startswith("cuda") else None
if binaries is None:
    raise SystemExit("no CUDA build: skipped")
model = write_tiny_llama(Path(sys.argv[1]) / "tiny.gguf")
before = inventory.nvidia_gpus()[0]["memory"]["used"]
began = time.monotonic()
proc = subprocess.Popen([str(binaries.server), "-m", str(model), "--port", "41999", "-ngl", "999", "-c", "2048"],
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
try:
    while time.monotonic() - began < 120:
        try:
            if httpx.get("http://127.0.0.1:41999/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.1)
    ready = time.monotonic() - began
    reply = httpx.post("http://127.0.0.1:41999/completion", json={"prompt": "hello", "n_predict": 256},
                       timeout=60).json()
    used = inventory.nvidia_gpus()[0]["memory"]["used"] - before
    print(f"/health after {ready:.2f} s; {reply['timings']['predicted_per_second']:.0f} tokens/s generated; "
          f"VRAM taken {used / 2**20:.0f} MiB")
finally:
    proc.terminate()
    out = proc.communicate(timeout=30)[0]
    print("\n".join(line for line in out.splitlines() if "CUDA" in line or "offloaded" in line)[:2000])
EOF

say "4. vLLM on the GPU"
"$PY" manage.py install_backend vllm 2>&1 | tail -3 || echo "vLLM could not be installed here"
"$PY" - "$work" <<'EOF'
import subprocess, sys, time
from pathlib import Path
import httpx
from tests.fixtures.tiny_hf import write_tiny_llama_hf
from workers_app import inventory
from workers_app.backends import get_backend
vllm = get_backend("vllm")
found = vllm.find("", vllm.variant(inventory.node_info()))
if found is None:
    raise SystemExit("vLLM is not installed: skipped")
model = write_tiny_llama_hf(Path(sys.argv[1]) / "tiny-hf")
began = time.monotonic()
proc = subprocess.Popen([str(found.entry), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
                         "--served-model-name", "tiny", "--port", "41998", "--gpu-memory-utilization", "0.1",
                         "--max-model-len", "512"], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
try:
    while time.monotonic() - began < 600:
        try:
            if httpx.get("http://127.0.0.1:41998/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.5)
    ready = time.monotonic() - began
    reply = httpx.post("http://127.0.0.1:41998/v1/chat/completions", timeout=60,
                       json={"model": "tiny", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]})
    print(f"vLLM /health after {ready:.1f} s; chat HTTP {reply.status_code}; "
          f"GPU memory used {inventory.nvidia_gpus()[0]['memory']['used'] / 2**30:.1f} GiB")
finally:
    subprocess.run(["pkill", "-TERM", "-P", str(proc.pid)], check=False)
    proc.terminate()
    proc.wait(timeout=60)
EOF
