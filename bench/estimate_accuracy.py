"""How close the llama.cpp RAM estimate is to what llama-server really uses, on CPU.

    .venv/bin/python bench/estimate_accuracy.py [--shapes small,medium,large] [--keep DIR] [--show-log]

Writes three random-weight llama GGUFs (a few hundred MB each, different layer counts, widths, FFN sizes and
vocabularies; F16 / Q8_0 data, the tiny_gguf tokenizer padded to the vocabulary size) to a temporary folder,
starts `llama-server -ngl 0 --ctx-size C` on each (C = the estimator's default, 8192), sends a few chat and
completion requests so the weights, KV cache and compute buffers are touched, and compares the predicted RAM
(`estimate(info, ctx_size=C, gpu_count=0).ram`) with the measured peak RSS (VmHWM). Goal: within ±15%.
llama.cpp mmaps the weights with MAP_POPULATE, so the whole file counts in the RSS (file-backed) from the start;
KV cache and compute buffers are anonymous. llama-server also keeps a prompt cache (`--cache-ram`, 8 GiB by
default) that grows with every distinct long prompt; the estimate leaves it out, and the table shows how much of
it these few requests left behind. Runs `--log-verbosity 4`, the level at which llama-server reports its buffers.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

import gguf
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scheduler_app.estimators.gguf import (  # noqa: E402
    PROCESS_OVERHEAD,
    compute_buffer_bytes,
    estimate,
    kv_cache_bytes,
    model_info,
)
from scheduler_app.estimators.gguf_reader import read_gguf_header  # noqa: E402
from tests.fixtures.sparse_gguf import _vocab  # noqa: E402
from tests.fixtures.tiny_gguf import _tensor_name, add_chatml_tokenizer_tail, add_llama_hparams  # noqa: E402
from workers_app import measure as backend_measure  # noqa: E402

MIB = 1024**2
DEFAULT_CTX = 8192
GOAL = 0.15


@dataclass(frozen=True)
class Shape:
    name: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    n_ff: int
    n_vocab: int
    dtype: str  # "F16" or "Q8_0"
    context_length: int = 32768


SHAPES = [
    Shape("small", n_layer=6, n_embd=768, n_head=12, n_head_kv=4, n_ff=2048, n_vocab=32000, dtype="F16"),
    Shape("medium", n_layer=12, n_embd=1024, n_head=16, n_head_kv=8, n_ff=2816, n_vocab=49152, dtype="Q8_0"),
    Shape("large", n_layer=16, n_embd=1536, n_head=12, n_head_kv=4, n_ff=4096, n_vocab=65536, dtype="Q8_0"),
]


def _random_tensor(rng: np.random.Generator, shape: tuple[int, int], dtype: str) -> np.ndarray:
    """Random weights (std ~0.02) already in their on-disk form: F16 values or Q8_0 blocks (f16 scale + 32 int8)."""
    rows, cols = shape
    if dtype == "F16":
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float16)
    n_blocks = rows * cols // 32
    blocks = np.empty((n_blocks, 34), dtype=np.uint8)
    blocks[:, :2] = np.full(n_blocks, 0.02 / 40, dtype=np.float16).view(np.uint8).reshape(n_blocks, 2)
    blocks[:, 2:] = rng.integers(-80, 81, size=(n_blocks, 32), dtype=np.int8).view(np.uint8)
    return blocks.reshape(rows, cols // 32 * 34)


def write_random_llama(path: pathlib.Path, shape: Shape, seed: int = 0) -> pathlib.Path:
    """A llama GGUF with random weights that llama-server loads and serves; tensors are generated one at a time."""
    head_dim = shape.n_embd // shape.n_head
    tokens, token_types, merges, eot, im_end = _vocab(shape.n_vocab)
    w = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    w.add_name(f"bench-{shape.name}")
    file_type = gguf.LlamaFileType.MOSTLY_F16 if shape.dtype == "F16" else gguf.LlamaFileType.MOSTLY_Q8_0
    w.add_file_type(int(file_type))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_llama_hparams(w, context_length=shape.context_length, n_embd=shape.n_embd, n_layer=shape.n_layer,
                      n_ff=shape.n_ff, n_head=shape.n_head, n_head_kv=shape.n_head_kv, n_vocab=shape.n_vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(token_types)
    add_chatml_tokenizer_tail(w, merges, eot, im_end)

    T = gguf.MODEL_TENSOR
    n_kv = head_dim * shape.n_head_kv
    plan: list[tuple[str, tuple[int, ...]]] = [(_tensor_name(T.TOKEN_EMBD), (shape.n_vocab, shape.n_embd))]
    for i in range(shape.n_layer):
        plan += [
            (_tensor_name(T.ATTN_NORM, i), (shape.n_embd,)),
            (_tensor_name(T.ATTN_Q, i), (shape.n_embd, shape.n_embd)),
            (_tensor_name(T.ATTN_K, i), (n_kv, shape.n_embd)),
            (_tensor_name(T.ATTN_V, i), (n_kv, shape.n_embd)),
            (_tensor_name(T.ATTN_OUT, i), (shape.n_embd, shape.n_embd)),
            (_tensor_name(T.FFN_NORM, i), (shape.n_embd,)),
            (_tensor_name(T.FFN_GATE, i), (shape.n_ff, shape.n_embd)),
            (_tensor_name(T.FFN_UP, i), (shape.n_ff, shape.n_embd)),
            (_tensor_name(T.FFN_DOWN, i), (shape.n_embd, shape.n_ff)),
        ]
    plan += [(_tensor_name(T.OUTPUT_NORM), (shape.n_embd,)), (_tensor_name(T.OUTPUT), (shape.n_vocab, shape.n_embd))]

    rng = np.random.default_rng(seed)

    def make(dims: tuple[int, ...]) -> np.ndarray:
        if len(dims) == 1:  # norms stay F32 (gains of 1), as llama.cpp's converter writes them
            return np.ones(dims, dtype=np.float32)
        return _random_tensor(rng, dims, shape.dtype)

    for name, dims in plan:  # infos first (sizes only), then the data, one tensor in memory at a time
        if len(dims) == 1 or shape.dtype == "F16":
            dtype = np.float32 if len(dims) == 1 else np.float16
            nbytes = int(np.prod(dims)) * np.dtype(dtype).itemsize
            w.add_tensor_info(name, dims, np.dtype(dtype), nbytes)
        else:
            qtype = gguf.GGMLQuantizationType.Q8_0
            nbytes = int(np.prod(dims)) // 32 * 34
            w.add_tensor_info(name, dims, np.dtype(np.float32), nbytes, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for _, dims in plan:
        w.write_tensor_data(make(dims))
    w.close()
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict, timeout: float = 300) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def _status_kib(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


class _Sampler(threading.Thread):
    """Samples the process tree every 20 ms the way a worker measures a backend for its instance's `measured`
    (workers_app.measure: PSS of the tree); keeps the peak."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid = pid
        self.peak = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            pids = backend_measure.tree_pids(self.pid)
            if not pids:
                return
            self.peak = max(self.peak, backend_measure.tree_memory(pids))
            self.stop.wait(0.02)


def measure(server: pathlib.Path, model: pathlib.Path, ctx_size: int, log_path: pathlib.Path,
            extra_args: tuple[str, ...] = ()) -> dict:
    """Start llama-server on `model`, exercise it, and return its memory numbers (bytes) and buffer sizes (MiB)."""
    port = _free_port()
    cmd = [str(server), "-m", str(model), "--host", "127.0.0.1", "--port", str(port), "-ngl", "0",
           "--ctx-size", str(ctx_size), "--log-verbosity", "4", *extra_args]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    sampler = _Sampler(proc.pid)
    sampler.start()
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"llama-server exited with {proc.returncode}; see {log_path}")
            try:
                with urllib.request.urlopen(base + "/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"llama-server not healthy after 180 s; see {log_path}")
            time.sleep(0.1)
        # A long prompt (full 512-token micro-batches through every layer), then chats that generate.
        _post(base + "/completion", {"prompt": "hello the world is " * 100, "n_predict": 16, "ignore_eos": True})
        for text in ("Say hello.", "Write a long story about a cat."):
            _post(base + "/v1/chat/completions", {"messages": [{"role": "user", "content": text}],
                                                  "max_tokens": 32, "temperature": 0.8})
        _post(base + "/completion", {"prompt": "hi", "n_predict": 1})  # logs the prompt cache's state
        time.sleep(0.2)
        numbers = {
            "hwm": _status_kib(proc.pid, "VmHWM") * 1024,
            "rss_anon": _status_kib(proc.pid, "RssAnon") * 1024,
            "rss_file": _status_kib(proc.pid, "RssFile") * 1024,
            "sampled_peak": sampler.peak,
            "worker": backend_measure.measure({0: proc.pid})["0"]["ram"],  # what the instance's `measured` says
        }
    finally:
        sampler.stop.set()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        sampler.join(timeout=1)
    numbers.update(parse_buffers(log_path.read_text(errors="replace")))
    return numbers


_BUFFER_RE = re.compile(r"(CPU_Mapped model|CPU_REPACK model|CPU model|CPU KV|CPU compute|CPU +output)"
                        r" buffer size\s*=\s*([\d.]+) MiB")
_PROMPT_CACHE_RE = re.compile(r"cache state: \d+ prompts, ([\d.]+) MiB")


def parse_buffers(log: str) -> dict:
    """llama-server's own report (at --log-verbosity 4), in MiB: its buffers, and the largest prompt-cache state."""
    found: dict[str, float] = {}
    for kind, mib in _BUFFER_RE.findall(log):
        kind = " ".join(kind.split())
        found[kind] = found.get(kind, 0.0) + float(mib)
    cache = [float(mib) for mib in _PROMPT_CACHE_RE.findall(log)]
    return {"buffers": found, "prompt_cache_mib": max(cache, default=0.0)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=",".join(s.name for s in SHAPES))
    parser.add_argument("--keep", help="write the models (and logs) here and keep them")
    parser.add_argument("--show-log", action="store_true", help="print llama-server's buffer report per model")
    args = parser.parse_args()
    from workers_app.backends.llama_box_install import ensure

    server = ensure().server
    wanted = [s for s in SHAPES if s.name in args.shapes.split(",")]
    work = pathlib.Path(args.keep or tempfile.mkdtemp(prefix="aimind-estimate-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        for shape in wanted:
            path = work / f"{shape.name}-{shape.dtype.lower()}.gguf"
            if not path.exists():
                started = time.perf_counter()
                write_random_llama(path, shape)
                elapsed = time.perf_counter() - started
                print(f"wrote {path.name}: {path.stat().st_size / MIB:.0f} MiB in {elapsed:.1f} s", flush=True)
            info = model_info([read_gguf_header(path)])
            ctx = min(DEFAULT_CTX, info.context_length or DEFAULT_CTX)
            predicted = estimate(info, ctx_size=ctx, gpu_count=0).ram
            measured = measure(server, path, ctx, work / f"{shape.name}.log")
            rows.append((shape, path.stat().st_size, info, ctx, predicted, measured))
            if args.show_log:
                print(f"  {shape.name}: llama-server buffers (MiB) {measured['buffers']}, prompt cache "
                      f"{measured['prompt_cache_mib']:.1f} MiB; estimator: kv "
                      f"{kv_cache_bytes(info, ctx, info.n_layer) / MIB:.1f}, compute "
                      f"{compute_buffer_bytes(info, ctx) / MIB:.1f}, overhead {PROCESS_OVERHEAD / MIB:.0f}", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    print()
    print(f"{'shape':<7} {'layers x embd x ff / vocab':<27} {'type':<5} {'file':>5} {'ctx':>5} {'predicted':>9} "
          f"{'VmHWM':>6} {'sampled':>7} {'worker':>6} {'error':>7} | {'KV':>4} {'compute: llama':>14} {'est.':>5} "
          f"{'prompt cache':>12} {'anon':>5} {'file-backed':>11}")
    worst = 0.0
    for shape, size, info, ctx, predicted, m in rows:
        error = (predicted - m["hwm"]) / m["hwm"]
        worst = max(worst, abs(error))
        dims = f"{shape.n_layer} x {shape.n_embd} x {shape.n_ff} / {shape.n_vocab}"
        buffers = m["buffers"]
        print(f"{shape.name:<7} {dims:<27} {shape.dtype:<5} {size / MIB:>5.0f} {ctx:>5} {predicted / MIB:>9.0f} "
              f"{m['hwm'] / MIB:>6.0f} {m['sampled_peak'] / MIB:>7.0f} {m['worker'] / MIB:>6.0f} {error:>+7.1%} | "
              f"{buffers.get('CPU KV', 0):>4.0f} {buffers.get('CPU compute', 0):>14.1f} "
              f"{compute_buffer_bytes(info, ctx) / MIB:>5.1f} {m['prompt_cache_mib']:>12.1f} "
              f"{m['rss_anon'] / MIB:>5.0f} {m['rss_file'] / MIB:>11.0f}")
    print("(all sizes in MiB; sampled: the peak of the worker's own measurement (PSS of the process tree) every "
          "20 ms; worker: what the instance's `measured` would say at the end; error = (predicted - VmHWM) / VmHWM; "
          "right of | : llama-server's own buffer report, the estimator's compute allowance, and the RSS split)")
    print(f"\nworst error {worst:.1%} (goal ±{GOAL:.0%}): {'OK' if worst <= GOAL else 'MISSED'}")
    return 0 if worst <= GOAL else 1


if __name__ == "__main__":
    sys.exit(main())
