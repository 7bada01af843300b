"""The sparse GGUF fixtures: tiny on disk, yet read back with real Llama-3 8B / 70B Q4_K_M shapes and sizes."""

from __future__ import annotations

import pytest

from scheduler_app.estimators.gguf import kv_cache_bytes, model_info
from scheduler_app.estimators.gguf_reader import read_gguf_header
from tests.fixtures.sparse_gguf import LLAMA3_8B, LLAMA3_70B, write_sparse_llama

GIB = 1024**3


@pytest.mark.parametrize(
    ("shape", "low_gib", "high_gib"),
    [(LLAMA3_8B, 4.50, 4.65), (LLAMA3_70B, 39.3, 39.9)],  # real Q4_K_M files: 4.92 GB (4.58 GiB), 42.5 GB (39.6 GiB)
    ids=["8b", "70b"],
)
def test_sparse_llama_reads_back_with_real_shapes(tmp_path, shape, low_gib, high_gib):
    path = write_sparse_llama(tmp_path / "m.gguf", **shape)

    stat = path.stat()
    assert stat.st_blocks * 512 < 10 * 1024**2  # the data section is a hole
    header = read_gguf_header(path)
    info = model_info([header])

    assert low_gib * GIB < info.weight_bytes < high_gib * GIB
    assert stat.st_size == header.data_offset + sum(-(-t.n_bytes // 32) * 32 for t in header.tensors)
    assert (info.architecture, info.n_layer, info.n_embd) == ("llama", shape["n_layer"], shape["n_embd"])
    assert (info.n_head, info.n_head_kv, info.n_ff) == (shape["n_head"], shape["n_head_kv"], shape["n_ff"])
    assert (info.n_vocab, info.context_length) == (shape["n_vocab"], shape["context_length"])
    assert info.head_dim_k == info.head_dim_v == 128
    assert len(header.tensors) == 2 + 9 * shape["n_layer"] + 1
    assert len(info.layer_bytes) == shape["n_layer"] and min(info.layer_bytes) > 0


def test_sparse_llama_8b_kv_cache_is_one_gib_at_8k(tmp_path):
    info = model_info([read_gguf_header(write_sparse_llama(tmp_path / "8b.gguf", **LLAMA3_8B))])
    assert kv_cache_bytes(info, 8192, info.n_layer) == 32 * 8192 * (8 * 128 + 8 * 128) * 2 == GIB


def test_sparse_llama_q4_k_m_type_mix(tmp_path):
    header = read_gguf_header(write_sparse_llama(tmp_path / "8b.gguf", **LLAMA3_8B))
    types = {t.name: t.ggml_type for t in header.tensors}
    q4_k, q6_k, f32 = 12, 14, 0
    assert types["token_embd.weight"] == q4_k and types["output.weight"] == q6_k
    assert types["output_norm.weight"] == types["blk.0.attn_norm.weight"] == f32
    assert sum(types[f"blk.{i}.ffn_down.weight"] == q6_k for i in range(32)) == 16
    assert sum(types[f"blk.{i}.attn_v.weight"] == q6_k for i in range(32)) == 16
    assert types["blk.5.attn_q.weight"] == types["blk.5.ffn_gate.weight"] == q4_k
