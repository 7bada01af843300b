"""Resource claims for llama.cpp's llama-server, from a GGUF header.

Model: llama.cpp mmaps the weights, keeps the token embedding on the CPU, and offloads the last
`k - 1` repeating blocks plus the output layer when `-ngl k` (k = n_layer + 1 is full offload). The KV
cache lives with its layer. Compute buffers are an allowance (see `compute_buffer_bytes`), and the
process itself costs `PROCESS_OVERHEAD` of RAM. Constants are calibrated by bench/estimate_accuracy.py.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from gguf.constants import GGMLQuantizationType

from scheduler_app.estimators.gguf_reader import ArrayInfo, GGUFHeader

# llama-server beside its buffers, measured (bench/estimate_accuracy.py): ~12 MiB of binary pages + ~2 MiB heap, plus
# ~200 B per vocabulary token (tokenizer tables, ~25 MiB at 128k) and room for a few short prompt-cache entries.
# Not included: the server's prompt cache (--cache-ram, 8 GiB by default) as it fills with long prompts.
PROCESS_OVERHEAD = 48 * 1024**2
UBATCH = 512  # llama-server's default -ub
# On x86 with AVX2, llama.cpp repacks CPU-resident Q4_0/Q4_K/IQ4_NL matrices into an extra anonymous copy
# (CPU_REPACK buffer) while the mapped file stays resident: those layers cost twice their size in RAM.
REPACKED_TYPES = {GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_K, GGMLQuantizationType.IQ4_NL}
POOLING_NONE, POOLING_RANK = 0, 4
EMBEDDING_ARCHITECTURES = {"bert", "nomic-bert", "jina-bert-v2", "nomic-bert-moe", "t5encoder"}
CACHE_TYPE_BYTES = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q5_1": 24 / 32, "q5_0": 22 / 32,
                    "q4_1": 20 / 32, "q4_0": 18 / 32, "iq4_nl": 18 / 32}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.")


@dataclass
class GGUFModelInfo:
    architecture: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim_k: int
    head_dim_v: int
    context_length: int
    pooling_type: int | None
    weight_bytes: int
    layer_bytes: list[int]
    non_layer_bytes: int
    output_bytes: int
    token_embd_bytes: int = 0
    output_tied: bool = False  # no output.weight: llama.cpp reuses token_embd (copied if the output is offloaded)
    n_vocab: int = 0
    n_ff: int = 0
    file_type: int | None = None
    categories: list[str] = field(default_factory=list)
    layer_repack_bytes: list[int] = field(default_factory=list)


@dataclass
class LlamaBoxClaim:
    ram: int
    vram: dict[int, int]  # position in the instance's GPU list -> bytes
    offload_layers: int
    total_layers: int
    tensor_split: list[float] | None = None


def _first_int(value, default: int = 0) -> int:
    """Per-layer values (lists) count by their maximum; missing means default."""
    if value is None or isinstance(value, ArrayInfo):
        return default
    if isinstance(value, list):
        return int(max(value)) if value else default
    return int(value)


def _categories(architecture: str, pooling_type: int | None, name: str) -> list[str]:
    if pooling_type == POOLING_RANK or "rerank" in name.lower():
        return ["reranker"]
    if (pooling_type is not None and pooling_type != POOLING_NONE) or architecture in EMBEDDING_ARCHITECTURES:
        return ["embedding"]
    return ["llm"]


def model_info(headers: list[GGUFHeader]) -> GGUFModelInfo:
    """One model from its header(s); split files carry metadata in the first part, tensors in all."""
    first = headers[0]
    tensors = [t for h in headers for t in h.tensors]
    n_layer = _first_int(first.arch_get("block_count"))
    layer_bytes = [0] * n_layer
    layer_repack_bytes = [0] * n_layer
    by_name = {}
    for t in tensors:
        by_name[t.name] = t
        match = _BLOCK_RE.match(t.name)
        if match and int(match[1]) < n_layer:
            layer_bytes[int(match[1])] += t.n_bytes
            if t.ggml_type in REPACKED_TYPES and len(t.shape) == 2:
                layer_repack_bytes[int(match[1])] += t.n_bytes
    weight_bytes = sum(t.n_bytes for t in tensors)
    token_embd = by_name.get("token_embd.weight")
    output = by_name.get("output.weight") or token_embd  # tied embeddings: the output reuses token_embd
    n_embd = _first_int(first.arch_get("embedding_length"))
    n_head = _first_int(first.arch_get("attention.head_count"), 1) or 1
    n_head_kv = _first_int(first.arch_get("attention.head_count_kv"), n_head) or n_head
    tokens = first.get("tokenizer.ggml.tokens")
    n_vocab = len(tokens) if tokens is not None else (token_embd.shape[-1] if token_embd else 0)
    pooling = first.arch_get("pooling_type")
    architecture = first.architecture
    return GGUFModelInfo(
        architecture=architecture,
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim_k=_first_int(first.arch_get("attention.key_length"), n_embd // n_head),
        head_dim_v=_first_int(first.arch_get("attention.value_length"), n_embd // n_head),
        context_length=_first_int(first.arch_get("context_length")),
        pooling_type=None if pooling is None else int(pooling),
        weight_bytes=weight_bytes,
        layer_bytes=layer_bytes,
        layer_repack_bytes=layer_repack_bytes,
        non_layer_bytes=weight_bytes - sum(layer_bytes),
        output_bytes=output.n_bytes if output else 0,
        output_tied="output.weight" not in by_name and token_embd is not None,
        token_embd_bytes=token_embd.n_bytes if token_embd else 0,
        n_vocab=n_vocab,
        n_ff=_first_int(first.arch_get("feed_forward_length")),
        file_type=first.get("general.file_type"),
        categories=_categories(architecture, None if pooling is None else int(pooling),
                               str(first.get("general.name", ""))),
    )


def kv_cache_bytes(info: GGUFModelInfo, ctx_size: int, layers: int, cache_type_k: str = "f16",
                   cache_type_v: str = "f16") -> int:
    per_token = info.n_head_kv * (info.head_dim_k * CACHE_TYPE_BYTES.get(cache_type_k, 2.0)
                                  + info.head_dim_v * CACHE_TYPE_BYTES.get(cache_type_v, 2.0))
    return int(layers * ctx_size * per_token)


def compute_buffer_bytes(info: GGUFModelInfo, ctx_size: int, parallel: int = 4) -> int:
    """llama.cpp's compute buffer for one -ub micro-batch with flash attention (on by default), plus its logits buffer.

    Matches llama-server's "compute buffer size" to 0.01 MiB on 8B / 70B / Qwen-0.5B / the bench shapes at 0.5k-32k
    ctx (within a few MiB above it when n_ff < 2.75 n_embd); it does not grow with n_vocab, n_head or n_layer.
    """
    mask = ctx_size * UBATCH * 2  # the f16 KQ mask, kv cells x ubatch: the only part that grows with ctx
    n_ff = info.n_ff or 4 * info.n_embd
    activations = (3 * n_ff + 4 * info.n_embd) * UBATCH * 4  # f32 peak in the FFN: gate, up, their product + residuals
    logits = info.n_vocab * 4 * (parallel if parallel > 0 else 4)  # last-token f32 logits per sequence (-np -1: 4)
    return mask + activations + logits


def split_layers(n: int, weights: list[float]) -> list[int]:
    """Whole layers per GPU in proportion to `weights` (largest remainder)."""
    total = sum(weights) or 1.0
    exact = [n * w / total for w in weights]
    counts = [int(x) for x in exact]
    for i in sorted(range(len(exact)), key=lambda i: exact[i] - counts[i], reverse=True)[: n - sum(counts)]:
        counts[i] += 1
    return counts


def estimate(info: GGUFModelInfo, *, ctx_size: int = 8192, offload_layers: int | None = None, gpu_count: int = 0,
             tensor_split: list[float] | None = None, cache_type_k: str = "f16", cache_type_v: str = "f16",
             parallel: int = 4, cache_ram: int = 0) -> LlamaBoxClaim:
    """The claim for offloading `offload_layers` of n_layer + 1 layers across `gpu_count` GPUs (0 = CPU only)."""
    total_layers = info.n_layer + 1
    k = total_layers if offload_layers is None else max(0, min(offload_layers, total_layers))
    if gpu_count <= 0:
        k = 0
    compute = compute_buffer_bytes(info, ctx_size, parallel)
    kv_per_layer = kv_cache_bytes(info, ctx_size, 1, cache_type_k, cache_type_v)
    gpu_blocks = max(0, k - 1)  # the output layer is the first one offloaded
    cpu_blocks = info.n_layer - gpu_blocks
    ram = (PROCESS_OVERHEAD + cache_ram + info.non_layer_bytes + sum(info.layer_bytes[:cpu_blocks])
           + sum(info.layer_repack_bytes[:cpu_blocks])
           + cpu_blocks * kv_per_layer + compute)
    if k == 0:
        return LlamaBoxClaim(ram=int(ram), vram={}, offload_layers=0, total_layers=total_layers)
    ram -= 0 if info.output_tied else info.output_bytes  # a tied output is a GPU copy; token_embd stays on the CPU
    weights = tensor_split if tensor_split and len(tensor_split) == gpu_count else [1.0] * gpu_count
    counts = split_layers(gpu_blocks, weights)
    vram: dict[int, int] = {}
    block = cpu_blocks
    for gpu, count in enumerate(counts):
        layer_weights = sum(info.layer_bytes[block:block + count])
        block += count
        vram[gpu] = layer_weights + count * kv_per_layer + compute
    vram[gpu_count - 1] += info.output_bytes  # the output layer goes with the last GPU
    return LlamaBoxClaim(ram=int(ram), vram={g: int(v) for g, v in vram.items()}, offload_layers=k,
                         total_layers=total_layers, tensor_split=tensor_split)


# ggml-rpc-server beside the buffers it is sent: an allowance for the 2.2 MB static binary and its heap (not measured).
RPC_SERVER_OVERHEAD = 32 * 1024**2


@dataclass
class SplitClaim:
    """llama-server's layers spread over its own CPU and several devices (`--rpc` servers first, then its own GPUs)."""

    main_ram: int  # the main's llama-server: token_embd, its CPU blocks (and their repacked copy), a compute buffer
    device_bytes: list[int]  # per device, in llama-server's device order; a device's RPC process is not included
    device_layers: list[int]  # layers per device; the output layer counts on the last
    cpu_blocks: int  # the first blocks, kept in the main's RAM
    total_layers: int

    @property
    def offload_layers(self) -> int:
        """-ngl: everything but the CPU blocks."""
        return self.total_layers - self.cpu_blocks


@dataclass(frozen=True)
class SplitCosts:
    """What each part of a split costs, for one model and context: computed once, priced for many splits."""

    main_fixed: int  # the main's RAM with every layer offloaded
    device_fixed: int  # the compute buffer each device keeps
    output: int  # the output layer, on the last device
    block: list[int]  # block i on a device: its weights and KV cache
    cpu_block: list[int]  # block i in the main's RAM: also its repacked copy (never on an RPC device)
    total_layers: int

    def claim(self, cpu_blocks: int, device_layers: list[int]) -> SplitClaim:
        """The first `cpu_blocks` blocks on the main's CPU, then `device_layers[d]` layers per device in order."""
        if (not device_layers or cpu_blocks < 0 or min(device_layers) < 0 or device_layers[-1] < 1
                or cpu_blocks + sum(device_layers) != self.total_layers):
            raise ValueError(f"{cpu_blocks} CPU blocks and {device_layers} do not make {self.total_layers} layers")
        main_ram = self.main_fixed + sum(self.cpu_block[:cpu_blocks])
        device_bytes = []
        block = cpu_blocks
        for d, layers in enumerate(device_layers):
            count = layers - 1 if d == len(device_layers) - 1 else layers  # the output layer is not a block
            device_bytes.append(sum(self.block[block:block + count]) + self.device_fixed)
            block += count
        device_bytes[-1] += self.output
        return SplitClaim(main_ram=main_ram, device_bytes=device_bytes, device_layers=list(device_layers),
                          cpu_blocks=cpu_blocks, total_layers=self.total_layers)


def split_costs(info: GGUFModelInfo, *, ctx_size: int = 8192, cache_type_k: str = "f16", cache_type_v: str = "f16",
                parallel: int = 4, cache_ram: int = 0) -> SplitCosts:
    """Costs for `-ngl K --rpc … -ts …`, on the same terms as `estimate` (which they match for one device)."""
    compute = compute_buffer_bytes(info, ctx_size, parallel)
    kv = kv_cache_bytes(info, ctx_size, 1, cache_type_k, cache_type_v)
    untied_output = 0 if info.output_tied else info.output_bytes  # a tied output is a device copy of token_embd
    repack = info.layer_repack_bytes or [0] * info.n_layer
    return SplitCosts(
        main_fixed=PROCESS_OVERHEAD + cache_ram + info.non_layer_bytes - untied_output + compute,
        device_fixed=compute,
        output=info.output_bytes,
        block=[b + kv for b in info.layer_bytes],
        cpu_block=[b + r + kv for b, r in zip(info.layer_bytes, repack, strict=True)],
        total_layers=info.n_layer + 1,
    )


def estimate_split(info: GGUFModelInfo, *, cpu_blocks: int, device_layers: list[int], **context) -> SplitClaim:
    """The claim of one split: `cpu_blocks` + sum(`device_layers`) = n_layer + 1 (see `SplitCosts.claim`)."""
    return split_costs(info, **context).claim(cpu_blocks, device_layers)
