"""Unit tests for the tiny GGUF fixture writer (no llama-server needed)."""

from __future__ import annotations

import pathlib

import gguf
import pytest

from tests.fixtures.tiny_gguf import CONTROL_TOKENS, write_tiny_llama


def _str(reader: gguf.GGUFReader, key: str) -> str:
    field = reader.fields[key]
    return bytes(field.parts[field.data[0]]).decode()


def _strs(reader: gguf.GGUFReader, key: str) -> list[str]:
    field = reader.fields[key]
    return [bytes(field.parts[i]).decode() for i in field.data]


def _int(reader: gguf.GGUFReader, key: str) -> int:
    field = reader.fields[key]
    return int(field.parts[field.data[0]][0])


@pytest.mark.parametrize("embedding", [False, True])
def test_tiny_llama_roundtrip(tmp_path: pathlib.Path, embedding: bool) -> None:
    path = write_tiny_llama(tmp_path / "sub" / "m.gguf", embedding=embedding, n_layer=2, name="t")
    assert path == tmp_path / "sub" / "m.gguf"
    assert path.stat().st_size < 1_000_000

    r = gguf.GGUFReader(path)
    assert _str(r, "general.architecture") == "llama"
    assert _str(r, "general.name") == "t"
    assert _int(r, "llama.block_count") == 2
    assert _int(r, "llama.embedding_length") == 64
    assert _int(r, "llama.attention.head_count_kv") == 4
    assert _int(r, "llama.rope.dimension_count") == 16
    assert _str(r, "tokenizer.ggml.model") == "gpt2"
    assert "<|im_start|>" in _str(r, "tokenizer.chat_template")
    if embedding:
        assert _int(r, "llama.pooling_type") == int(gguf.PoolingType.MEAN)
    else:
        assert "llama.pooling_type" not in r.fields

    tokens = _strs(r, "tokenizer.ggml.tokens")
    types = [int(r.fields["tokenizer.ggml.token_type"].parts[i][0]) for i in r.fields["tokenizer.ggml.token_type"].data]
    assert len(tokens) == len(types) == _int(r, "llama.vocab_size")
    assert len(set(tokens)) == len(tokens)
    for tok in CONTROL_TOKENS:
        assert types[tokens.index(tok)] == int(gguf.TokenType.CONTROL)
    assert _int(r, "tokenizer.ggml.eos_token_id") == tokens.index("<|im_end|>")
    for merge in _strs(r, "tokenizer.ggml.merges"):
        left, right = merge.split(" ")
        assert left in tokens and right in tokens and left + right in tokens

    shapes = {t.name: tuple(int(x) for x in t.shape) for t in r.tensors}  # GGUF order: (in, out)
    assert shapes["token_embd.weight"] == (64, len(tokens))
    assert shapes["output.weight"] == (64, len(tokens))
    assert shapes["blk.1.ffn_down.weight"] == (128, 64)
    assert len(shapes) == 3 + 9 * 2


def test_tiny_llama_is_deterministic(tmp_path: pathlib.Path) -> None:
    a = write_tiny_llama(tmp_path / "a.gguf", seed=1).read_bytes()
    b = write_tiny_llama(tmp_path / "b.gguf", seed=1).read_bytes()
    c = write_tiny_llama(tmp_path / "c.gguf", seed=2).read_bytes()
    assert a == b
    assert a != c


def test_tiny_llama_gqa_shapes(tmp_path: pathlib.Path) -> None:
    r = gguf.GGUFReader(write_tiny_llama(tmp_path / "g.gguf", n_embd=64, n_head=4, n_head_kv=2))
    assert _int(r, "llama.attention.head_count_kv") == 2
    shapes = {t.name: tuple(int(x) for x in t.shape) for t in r.tensors}
    assert shapes["blk.0.attn_k.weight"] == (64, 32)
    with pytest.raises(ValueError):
        write_tiny_llama(tmp_path / "bad.gguf", n_head=4, n_head_kv=3)
