"""How close the product's memory claim for a llama.cpp model is to what its worker measures it using, on CPU.

    .venv/bin/python bench/estimate_accuracy.py [--shapes small,medium,large] [--heartbeats 5] [--keep DIR]
                                                [--show-log]

Writes three random-weight llama GGUFs (a few hundred MB each, different layer counts, widths, FFN sizes and
vocabularies; F16 / Q8_0 data, the tiny_gguf tokenizer padded to the vocabulary size) to a temporary folder, runs
the product (`manage.py up`, as the end-to-end tests and bench/gateway.py do) and deploys each model in turn. The
scheduler claims its memory (the instance's `computed_resource_claim`, at the context size it gives llama-server,
8192 by default); a few chat and completion requests through the gateway touch the weights, KV cache and compute
buffers; the worker measures the backend's process tree at every heartbeat (PSS, and on NVIDIA GPUs its VRAM: the
instance's `measured`). The bench keeps the largest measurement over the heartbeats from `running` until
`--heartbeats` more have come after the requests, and compares it with the claim. Goal: within ±15 % (the
over-claim flag's line).
llama.cpp mmaps the weights with MAP_POPULATE, so the whole file counts in the RSS (file-backed) from the start;
KV cache and compute buffers are anonymous. llama-server also keeps a prompt cache (`--cache-ram`, 8 GiB by
default) that grows with every distinct long prompt; the claim leaves it out, and the table shows how much of
it these few requests left behind. Runs `--log-verbosity 4`, the level at which llama-server reports its buffers.
"""

from __future__ import annotations

import argparse
import pathlib
import re
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

import gguf
import httpx
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.product import deploy, start_system  # noqa: E402
from scheduler_app.estimators.gguf import PROCESS_OVERHEAD, compute_buffer_bytes, kv_cache_bytes, model_info  # noqa: E402
from scheduler_app.estimators.gguf_reader import read_gguf_header  # noqa: E402
from tests.fixtures.sparse_gguf import _vocab  # noqa: E402
from tests.fixtures.tiny_gguf import _tensor_name, add_chatml_tokenizer_tail, add_llama_hparams  # noqa: E402

MIB = 1024**2
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


def _status_kib(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def total(figures: dict | None) -> int:
    """RAM and VRAM together, of a claim or a measurement (the over-claim flag compares the same sums)."""
    figures = figures or {}
    return int(figures.get("ram") or 0) + sum(int(v or 0) for v in (figures.get("vram") or {}).values())


class Heartbeats(threading.Thread):
    """Reads the instance from the API a few times per heartbeat and keeps each new `measured` (one per heartbeat:
    the server stamps its time)."""

    def __init__(self, client: httpx.Client, instance_id: int):
        super().__init__(daemon=True)
        self.client = client
        self.instance_id = instance_id
        self.seen: dict[str, dict] = {}
        self.last: dict = {}
        self.stop = threading.Event()
        self.lock = threading.Lock()

    def run(self) -> None:
        while not self.stop.wait(0.25):
            try:
                instance = self.client.get(f"/api/v1/instances/{self.instance_id}").json()
            except httpx.HTTPError:
                continue
            measured = instance.get("measured") or {}
            with self.lock:
                self.last = instance
                if measured.get("at"):
                    self.seen.setdefault(measured["at"], measured)

    def count(self) -> int:
        with self.lock:
            return len(self.seen)


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.1)


def measure(system, name: str, model: pathlib.Path, heartbeats: int) -> dict:
    """Deploy `model`, exercise it through the gateway, and return its claim, the worker's measurements (bytes),
    the kernel's view of the process, and llama-server's buffer sizes (MiB)."""
    instance = deploy(system, name, model, ["--log-verbosity", "4"], timeout=300)
    with system.client() as c:
        watch = Heartbeats(c, instance["id"])
        watch.start()
        try:
            _wait(lambda: watch.count() >= 1, 60, f"{name}'s first measurement")
            started_log = c.get(f"/api/v1/instances/{instance['id']}/logs", params={"tail": 10000}).text
            # A long prompt (full 512-token micro-batches through every layer), then chats that generate.
            for route, body in (("completions", {"prompt": "hello the world is " * 100, "max_tokens": 16,
                                                 "ignore_eos": True}),
                                ("chat/completions", {"messages": [{"role": "user", "content": "Say hello."}],
                                                      "max_tokens": 32, "temperature": 0.8}),
                                ("chat/completions", {"messages": [{"role": "user", "content":
                                                                    "Write a long story about a cat."}],
                                                      "max_tokens": 32, "temperature": 0.8}),
                                ("completions", {"prompt": "hi", "max_tokens": 1})):  # logs the prompt cache's state
                answer = c.post(f"/v1/{route}", json={"model": name, **body}, timeout=300)
                assert answer.status_code == 200, answer.text
            after = watch.count()
            _wait(lambda: watch.count() >= after + heartbeats, 30 + 10 * heartbeats,
                  f"{heartbeats} heartbeats after the requests")
            pid = instance["pid"]
            kernel = {"hwm": _status_kib(pid, "VmHWM") * 1024, "rss_anon": _status_kib(pid, "RssAnon") * 1024,
                      "rss_file": _status_kib(pid, "RssFile") * 1024}
            final_log = c.get(f"/api/v1/instances/{instance['id']}/logs", params={"tail": 10000}).text
        finally:
            watch.stop.set()
            watch.join(timeout=5)
        c.delete(f"/api/v1/models/{instance['model']}")
    samples = list(watch.seen.values())
    peak = max(samples, key=total)
    return {"claim": watch.last.get("computed_resource_claim") or instance["computed_resource_claim"],
            "measured": total(peak), "heartbeats": len(samples),
            "flagged": any(sample.get("over_claim") for sample in samples), **kernel,
            "buffers": parse_buffers(started_log)["buffers"],
            "prompt_cache_mib": parse_buffers(final_log)["prompt_cache_mib"]}


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
    parser.add_argument("--shapes", default=",".join(s.name for s in SHAPES),
                        help="which models to measure (all three: about 2 minutes on 2 cores)")
    parser.add_argument("--heartbeats", type=int, default=5,
                        help="measurements to wait for after the requests; the largest of all counts")
    parser.add_argument("--keep", help="write the models (and the product's data) here and keep them")
    parser.add_argument("--show-log", action="store_true", help="print llama-server's buffer report per model")
    args = parser.parse_args()
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
        product = work / "product"
        shutil.rmtree(product, ignore_errors=True)
        product.mkdir()
        system = start_system(product, worker_name="estimate-worker")
        try:
            for shape in wanted:
                path = work / f"{shape.name}-{shape.dtype.lower()}.gguf"
                info = model_info([read_gguf_header(path)])
                m = measure(system, f"estimate-{shape.name}", path, args.heartbeats)
                rows.append((shape, path.stat().st_size, info, m))
                print(f"measured {shape.name}: {m['heartbeats']} heartbeats", flush=True)
                if args.show_log:
                    ctx = int(m["claim"].get("ctx_size") or 0)
                    print(f"  {shape.name}: llama-server buffers (MiB) {m['buffers']}, prompt cache "
                          f"{m['prompt_cache_mib']:.1f} MiB; estimator: kv "
                          f"{kv_cache_bytes(info, ctx, info.n_layer) / MIB:.1f}, compute "
                          f"{compute_buffer_bytes(info, ctx) / MIB:.1f}, overhead {PROCESS_OVERHEAD / MIB:.0f}",
                          flush=True)
        finally:
            system.stop()
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    print()
    print(f"{'shape':<7} {'layers x embd x ff / vocab':<27} {'type':<5} {'file':>5} {'ctx':>5} {'claim':>6} "
          f"{'measured':>8} {'beats':>5} {'error':>7} {'flag':>4} {'VmHWM':>6} | {'KV':>4} {'compute: llama':>14} "
          f"{'est.':>5} {'prompt cache':>12} {'anon':>5} {'file-backed':>11}")
    worst = 0.0
    for shape, size, info, m in rows:
        claim, ctx = total(m["claim"]), int(m["claim"].get("ctx_size") or 0)
        error = (claim - m["measured"]) / m["measured"]
        worst = max(worst, abs(error))
        dims = f"{shape.n_layer} x {shape.n_embd} x {shape.n_ff} / {shape.n_vocab}"
        buffers = m["buffers"]
        print(f"{shape.name:<7} {dims:<27} {shape.dtype:<5} {size / MIB:>5.0f} {ctx:>5} {claim / MIB:>6.0f} "
              f"{m['measured'] / MIB:>8.0f} {m['heartbeats']:>5} {error:>+7.1%} {'yes' if m['flagged'] else 'no':>4} "
              f"{m['hwm'] / MIB:>6.0f} | {buffers.get('CPU KV', 0):>4.0f} {buffers.get('CPU compute', 0):>14.1f} "
              f"{compute_buffer_bytes(info, ctx) / MIB:>5.1f} {m['prompt_cache_mib']:>12.1f} "
              f"{m['rss_anon'] / MIB:>5.0f} {m['rss_file'] / MIB:>11.0f}")
    print("(all sizes in MiB; claim: the instance's computed_resource_claim, RAM + VRAM; measured: the largest of the "
          "worker's measurements (the instance's `measured`: PSS of the backend's process tree, + its VRAM) over "
          "`beats` heartbeats; error = (claim - measured) / measured; flag: the product flagged it as using more "
          "than it claimed; VmHWM: the kernel's peak RSS of llama-server, for reference; right of | : "
          "llama-server's own buffer report, the estimator's compute allowance, and the RSS split)")
    print(f"\nworst error {worst:.1%} (goal ±{GOAL:.0%}): {'OK' if worst <= GOAL else 'MISSED'}")
    return 0 if worst <= GOAL else 1


if __name__ == "__main__":
    sys.exit(main())
