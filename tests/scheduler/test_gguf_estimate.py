"""llama-server resource claims from GGUF headers: model info, KV cache, CPU / full / partial / multi-GPU offload."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from models_app.sources.local import split_gguf_parts
from scheduler_app.estimators.gguf import (
    PROCESS_OVERHEAD,
    UBATCH,
    compute_buffer_bytes,
    estimate,
    kv_cache_bytes,
    model_info,
)
from scheduler_app.estimators.gguf_reader import read_gguf_header
from tests.fixtures.sparse_gguf import LLAMA3_8B, write_sparse_llama

GIB = 1024**3
Q = gguf.GGMLQuantizationType


@pytest.fixture(scope="module")
def info_8b(tmp_path_factory):
    path = write_sparse_llama(tmp_path_factory.mktemp("est") / "8b.gguf", **LLAMA3_8B)
    return model_info([read_gguf_header(path)])


def write_random(path, *, n_layer: int = 3, n_embd: int = 64, n_vocab: int = 96, tied: bool = False,
                 pooling: gguf.PoolingType | None = None, arch: str = "llama", name: str = "rand",
                 split_max_tensors: int = 0):
    """A small llama-like GGUF with random F32 / Q8_0 tensors, optionally tied, pooled or split."""
    rng = np.random.default_rng(1)
    w = gguf.GGUFWriter(str(path), arch, split_max_tensors=split_max_tensors)
    w.add_name(name)
    w.add_block_count(n_layer)
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(2 * n_embd)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_context_length(4096)
    w.add_file_type(int(gguf.LlamaFileType.MOSTLY_Q8_0))
    if pooling is not None:
        w.add_pooling_type(pooling)

    def q8(rows: int, cols: int) -> np.ndarray:
        return gguf.quants.quantize(rng.random((rows, cols), dtype=np.float32), Q.Q8_0)

    w.add_tensor("token_embd.weight", q8(n_vocab, n_embd), raw_dtype=Q.Q8_0)
    for i in range(n_layer):
        w.add_tensor(f"blk.{i}.attn_norm.weight", rng.random(n_embd, dtype=np.float32))
        w.add_tensor(f"blk.{i}.attn_q.weight", q8(n_embd, n_embd), raw_dtype=Q.Q8_0)
        w.add_tensor(f"blk.{i}.attn_k.weight", q8(n_embd // 2, n_embd), raw_dtype=Q.Q8_0)
        w.add_tensor(f"blk.{i}.ffn_up.weight", q8(2 * n_embd, n_embd), raw_dtype=Q.Q8_0)
    w.add_tensor("output_norm.weight", rng.random(n_embd, dtype=np.float32))
    if not tied:
        w.add_tensor("output.weight", q8(n_vocab, n_embd), raw_dtype=Q.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def info_of(path):
    return model_info([read_gguf_header(p) for p in split_gguf_parts(path)])


def test_llama3_8b_model_info(info_8b):
    i = info_8b
    assert (i.architecture, i.n_layer, i.n_embd, i.n_head, i.n_head_kv) == ("llama", 32, 4096, 32, 8)
    assert (i.head_dim_k, i.head_dim_v, i.n_ff, i.n_vocab, i.context_length) == (128, 128, 14336, 128256, 131072)
    assert i.pooling_type is None and i.categories == ["llm"]
    assert i.file_type == int(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    assert 4.6e9 < i.weight_bytes < 4.95e9  # the real Meta-Llama-3-8B Q4_K_M file: 4.92 GB
    assert i.weight_bytes == sum(i.layer_bytes) + i.non_layer_bytes and len(i.layer_bytes) == 32
    assert i.output_bytes == 128256 * 4096 // 256 * 210 and not i.output_tied  # Q6_K output
    assert i.token_embd_bytes == 128256 * 4096 // 256 * 144  # Q4_K token embedding
    assert i.non_layer_bytes == i.output_bytes + i.token_embd_bytes + 4096 * 4  # + the f32 output_norm
    print(f"\n8B: weights {i.weight_bytes / GIB:.3f} GiB, blocks {sum(i.layer_bytes) / GIB:.3f} GiB")


@pytest.mark.parametrize(
    ("k", "v", "expected"),
    [("f16", "f16", GIB), ("f32", "f32", 2 * GIB), ("bf16", "bf16", GIB), ("q8_0", "q8_0", GIB * 17 // 32),
     ("q4_0", "q4_0", GIB * 9 // 32), ("f16", "q8_0", GIB // 2 + GIB * 17 // 64)],
)
def test_kv_cache_bytes(info_8b, k, v, expected):
    assert 32 * 8192 * (1024 + 1024) * 2 == GIB
    assert kv_cache_bytes(info_8b, 8192, 32, k, v) == expected


def test_cpu_only(info_8b):
    claim = estimate(info_8b, ctx_size=8192)
    i = info_8b
    kv, compute = kv_cache_bytes(i, 8192, 32), compute_buffer_bytes(i, 8192)
    assert claim.vram == {} and claim.offload_layers == 0 and claim.total_layers == 33
    assert claim.ram == PROCESS_OVERHEAD + i.weight_bytes + sum(i.layer_repack_bytes) + kv + compute
    assert estimate(i, ctx_size=8192, gpu_count=2, offload_layers=0) == claim  # -ngl 0 on GPUs: CPU only
    assert estimate(i, ctx_size=16384).ram - claim.ram == GIB + 8192 * UBATCH * 2  # KV + the KQ mask grow with ctx
    print(f"\n8B CPU only, ctx 8192: RAM {claim.ram / GIB:.3f} GiB (KV {kv / GIB:.3f} GiB, "
          f"compute {compute / 2**20:.0f} MiB, CPU repack copy {sum(i.layer_repack_bytes) / GIB:.3f} GiB)")


def test_full_offload_one_gpu(info_8b):
    i = info_8b
    claim = estimate(i, ctx_size=8192, gpu_count=1)
    compute = compute_buffer_bytes(i, 8192)
    assert claim.offload_layers == claim.total_layers == 33
    assert claim.vram == {0: sum(i.layer_bytes) + GIB + i.output_bytes + compute}
    assert claim.ram == PROCESS_OVERHEAD + i.non_layer_bytes - i.output_bytes + compute  # token_embd stays on CPU
    assert estimate(i, ctx_size=8192, gpu_count=1, offload_layers=99) == claim  # clamped to n_layer + 1
    print(f"\n8B full offload, ctx 8192: VRAM {claim.vram[0] / GIB:.3f} GiB, RAM {claim.ram / GIB:.3f} GiB")


def test_partial_offload_moves_the_last_blocks_and_output_first(info_8b):
    i = info_8b
    compute, kv_layer = compute_buffer_bytes(i, 8192), kv_cache_bytes(i, 8192, 1)
    only_output = estimate(i, gpu_count=1, offload_layers=1)
    assert only_output.vram == {0: i.output_bytes + compute}
    half = estimate(i, gpu_count=1, offload_layers=17)
    assert half.vram[0] == sum(i.layer_bytes[16:]) + 16 * kv_layer + i.output_bytes + compute
    previous = estimate(i, ctx_size=8192)
    for k in range(1, 34):
        claim = estimate(i, gpu_count=1, offload_layers=k)
        assert claim.offload_layers == k
        cpu_blocks = 33 - k if k else 32
        # nothing is lost or counted twice: weights + KV, plus one compute buffer per device and the overhead
        assert (claim.ram + claim.vram[0] - 2 * compute - PROCESS_OVERHEAD - sum(i.layer_repack_bytes[:cpu_blocks])
                == i.weight_bytes + GIB)
        assert claim.ram < previous.ram and claim.vram[0] > previous.vram.get(0, 0)
        previous = claim


@pytest.mark.parametrize(("split", "layers"), [(None, (16, 16)), ([3.0, 1.0], (24, 8)), ([1.0], (16, 16))])
def test_multi_gpu_whole_layers_by_tensor_split(info_8b, split, layers):
    i = info_8b
    compute, kv_layer = compute_buffer_bytes(i, 8192), kv_cache_bytes(i, 8192, 1)
    claim = estimate(i, gpu_count=2, tensor_split=split)
    first, second = layers
    assert claim.vram[0] == sum(i.layer_bytes[:first]) + first * kv_layer + compute
    assert claim.vram[1] == sum(i.layer_bytes[first:]) + second * kv_layer + i.output_bytes + compute  # output last
    assert claim.tensor_split == split


def test_cache_types_and_parallel_change_the_claim(info_8b):
    f16 = estimate(info_8b, gpu_count=1)
    q8 = estimate(info_8b, gpu_count=1, cache_type_k="q8_0", cache_type_v="q8_0")
    assert f16.vram[0] - q8.vram[0] == GIB - GIB * 17 // 32
    assert estimate(info_8b, parallel=8).ram - estimate(info_8b).ram == 128256 * 4 * 4  # 4 more logit rows


def test_tied_output_stays_in_ram_and_is_copied_to_the_gpu(tmp_path):
    tied = info_of(write_random(tmp_path / "tied.gguf", tied=True))
    assert tied.output_tied and tied.output_bytes == tied.token_embd_bytes > 0
    cpu, gpu = estimate(tied, ctx_size=512), estimate(tied, ctx_size=512, gpu_count=1)
    compute = compute_buffer_bytes(tied, 512)
    assert gpu.ram == PROCESS_OVERHEAD + tied.non_layer_bytes + compute  # token_embd (= output) stays
    assert gpu.vram[0] == sum(tied.layer_bytes) + kv_cache_bytes(tied, 512, 3) + tied.output_bytes + compute
    assert cpu.ram == PROCESS_OVERHEAD + tied.weight_bytes + kv_cache_bytes(tied, 512, 3) + compute  # no Q4 repack


def test_untied_output_of_the_same_size_leaves_ram(tmp_path):
    """Q8_0 token_embd and output have equal sizes, yet the output is its own tensor and moves to the GPU."""
    info = info_of(write_random(tmp_path / "untied.gguf"))
    assert not info.output_tied and info.output_bytes == info.token_embd_bytes
    claim = estimate(info, ctx_size=512, gpu_count=1)
    assert claim.ram == PROCESS_OVERHEAD + info.non_layer_bytes - info.output_bytes + compute_buffer_bytes(info, 512)


def test_split_files_give_the_same_info(tmp_path):
    whole = info_of(write_random(tmp_path / "m.gguf"))
    (tmp_path / "split").mkdir()
    write_random(tmp_path / "split" / "m.gguf", split_max_tensors=5)
    parts = sorted((tmp_path / "split").iterdir())
    assert [p.name for p in parts] == [f"m-0000{n}-of-00003.gguf" for n in (1, 2, 3)]  # 15 tensors, 5 a part
    assert split_gguf_parts(parts[2]) == parts
    assert info_of(parts[0]) == whole


@pytest.mark.parametrize(
    ("kwargs", "categories"),
    [({}, ["llm"]), ({"pooling": gguf.PoolingType.MEAN}, ["embedding"]), ({"pooling": gguf.PoolingType.NONE}, ["llm"]),
     ({"pooling": gguf.PoolingType.RANK}, ["reranker"]), ({"name": "bge-reranker-v2-m3"}, ["reranker"]),
     ({"arch": "bert"}, ["embedding"])],
    ids=["llm", "mean", "none", "rank", "rerank-name", "bert"],
)
def test_categories(tmp_path, kwargs, categories):
    info = info_of(write_random(tmp_path / "m.gguf", **kwargs))
    assert info.categories == categories
    assert info.pooling_type == (None if kwargs.get("pooling") is None else int(kwargs["pooling"]))
