"""The fast GGUF header reader: agrees with gguf.GGUFReader, skips big arrays, fails clearly on bad input."""

from __future__ import annotations

import io
import struct
import time

import gguf
import numpy as np
import pytest
from gguf.quants import quantize

from models_app.sources.local import split_gguf_parts
from scheduler_app.estimators.gguf_reader import (
    SMALL_ARRAY,
    ArrayInfo,
    GGUFFormatError,
    read_gguf_header,
)
from tests.fixtures.sparse_gguf import LLAMA3_8B, write_sparse_llama

V = gguf.GGUFValueType
Q = gguf.GGMLQuantizationType


def write_small(path, *, endianess=gguf.GGUFEndian.LITTLE, alignment: int | None = None):
    """Every scalar type, strings, small and big arrays, and tensors in F32 / F16 / Q8_0 / Q4_0 with real data."""
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "llama", endianess=endianess)
    if alignment:
        w.add_custom_alignment(alignment)
    w.add_name("small")
    w.add_uint8("t.u8", 200)
    w.add_int8("t.i8", -5)
    w.add_uint16("t.u16", 60000)
    w.add_int16("t.i16", -30000)
    w.add_uint32("t.u32", 4_000_000_000)
    w.add_int32("t.i32", -2_000_000_000)
    w.add_float32("t.f32", 0.1)
    w.add_bool("t.bool", True)
    w.add_uint64("t.u64", 2**63 + 5)
    w.add_int64("t.i64", -(2**62))
    w.add_float64("t.f64", 1 / 3)
    w.add_string("t.str", "héllo ✓")
    w.add_key_value("t.empty", "", V.STRING)  # add_string drops empty strings
    w.add_array("t.small_ints", [1, 2, 3])
    w.add_array("t.small_strs", ["a", "bb", ""])
    w.add_array("t.edge_ints", list(range(SMALL_ARRAY)))
    w.add_array("t.big_floats", rng.random(1000).astype(np.float32).tolist())
    w.add_array("t.big_strs", [f"tok{i}" * (i % 5) for i in range(SMALL_ARRAY + 1)])
    w.add_block_count(2)
    w.add_tensor("token_embd.weight", rng.random((10, 64), dtype=np.float32))
    w.add_tensor("blk.0.attn_q.weight", rng.random((4, 8), dtype=np.float32).astype(np.float16))
    w.add_tensor("blk.0.ffn_up.weight", quantize(rng.random((3, 64), dtype=np.float32), Q.Q8_0), raw_dtype=Q.Q8_0)
    w.add_tensor("blk.1.ffn_up.weight", quantize(rng.random((2, 96), dtype=np.float32), Q.Q4_0), raw_dtype=Q.Q4_0)
    w.add_tensor("output_norm.weight", rng.random(7, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture
def small(tmp_path):
    return write_small(tmp_path / "small.gguf")


def _same_value(ours, field: gguf.ReaderField) -> None:
    expected = field.contents()
    if isinstance(ours, ArrayInfo):
        assert field.types[0] == V.ARRAY and ours.element_type == field.types[-1]
        assert len(ours) == len(expected) > SMALL_ARRAY
    else:
        assert ours == expected


def test_matches_gguf_reader(small):
    header = read_gguf_header(small)
    reader = gguf.GGUFReader(small)

    assert header.version == 3
    assert set(header.metadata) == set(reader.fields) - {"GGUF.version", "GGUF.tensor_count", "GGUF.kv_count"}
    for key, value in header.metadata.items():
        _same_value(value, reader.fields[key])
    assert header.alignment == reader.alignment == 32
    assert header.data_offset == reader.data_offset
    assert [t.name for t in header.tensors] == [t.name for t in reader.tensors]
    for ours, theirs in zip(header.tensors, reader.tensors, strict=True):
        assert ours.shape == tuple(int(x) for x in theirs.shape)  # GGUF order (ne): innermost dimension first
        assert ours.ggml_type == theirs.tensor_type
        assert header.data_offset + ours.offset == theirs.data_offset
        assert ours.n_bytes == theirs.n_bytes
    assert header.architecture == "llama"
    assert header.get("general.name") == "small" and header.get("missing", 7) == 7
    assert header.arch_get("block_count") == 2 and header.arch_get("nope") is None


def test_big_arrays_become_markers_and_small_ones_stay(small):
    meta = read_gguf_header(small).metadata
    assert meta["t.small_ints"] == [1, 2, 3] and meta["t.small_strs"] == ["a", "bb", ""]
    assert meta["t.edge_ints"] == list(range(SMALL_ARRAY))  # exactly SMALL_ARRAY elements: kept
    assert meta["t.big_floats"] == ArrayInfo(int(V.FLOAT32), 1000)
    assert meta["t.big_strs"] == ArrayInfo(int(V.STRING), SMALL_ARRAY + 1)
    assert meta["t.str"] == "héllo ✓" and meta["t.empty"] == ""
    assert meta["t.u64"] == 2**63 + 5 and meta["t.bool"] is True
    assert meta["t.f64"] == 1 / 3 and meta["t.f32"] == pytest.approx(0.1)


class _NoSeek:
    """A sequential stream with only read(), as a network body would be."""

    def __init__(self, data: bytes, chunk: int | None = None):
        self._f, self._chunk = io.BytesIO(data), chunk

    def read(self, n: int) -> bytes:
        return self._f.read(n if self._chunk is None else min(n, self._chunk))


class _Counting(io.RawIOBase):
    """Seekable, counts the bytes actually read (to show big fixed-size arrays are skipped with seek)."""

    def __init__(self, data: bytes):
        self._f, self.bytes_read = io.BytesIO(data), 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._f.tell()

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._f.seek(offset, whence)

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self.bytes_read += len(data)
        return data


@pytest.mark.parametrize("kind", ["bytesio", "no_seek", "short_reads", "counting"])
def test_file_like_sources_read_the_same(small, kind):
    data = small.read_bytes()
    source = {"bytesio": lambda: io.BytesIO(data), "no_seek": lambda: _NoSeek(data),
              "short_reads": lambda: _NoSeek(data, chunk=3), "counting": lambda: _Counting(data)}[kind]()
    assert read_gguf_header(source) == read_gguf_header(small)


def test_big_fixed_size_arrays_are_skipped_by_seeking(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "a.gguf"), "llama")
    w.add_array("t.big", [0.5] * 200_000)
    w.add_string("t.after", "still here")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    source = _Counting((tmp_path / "a.gguf").read_bytes())
    header = read_gguf_header(source)
    assert header.metadata["t.big"] == ArrayInfo(int(V.FLOAT32), 200_000)
    assert header.metadata["t.after"] == "still here"
    assert source.bytes_read < 10_000  # the 800 kB array was seeked over, not read


def test_gguf_v2_reads_like_v3(small, tmp_path):
    data = bytearray(small.read_bytes())
    data[4:8] = struct.pack("<I", 2)  # v2 and v3 share the little-endian layout
    v2 = read_gguf_header(io.BytesIO(bytes(data)))
    v3 = read_gguf_header(small)
    assert v2.version == 2
    assert (v2.metadata, v2.tensors, v2.data_offset) == (v3.metadata, v3.tensors, v3.data_offset)


def test_custom_alignment(tmp_path):
    path = write_small(tmp_path / "aligned.gguf", alignment=64)
    header = read_gguf_header(path)
    assert header.alignment == 64 and header.data_offset % 64 == 0
    assert header.data_offset == gguf.GGUFReader(path).data_offset


def _raw(*, version: int = 3, kv: bytes = b"", n_kv: int = 0, n_tensors: int = 0) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv) + kv


def _key(name: str) -> bytes:
    return struct.pack("<Q", len(name)) + name.encode()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"GGML" + bytes(20), "bad magic"),
        (b"", "truncated"),
        (_raw(version=1), "unsupported GGUF version 1"),
        (_raw(version=4), "unsupported GGUF version 4"),
        (_raw(n_kv=1, kv=_key("k") + struct.pack("<I", 13)), "unknown GGUF value type 13"),
        (_raw(n_kv=1, kv=_key("k") + struct.pack("<IIQ", 9, 99, 1)), "unknown GGUF array element type 99"),
        (_raw(n_kv=1, kv=_key("k") + struct.pack("<IQ", 8, 2**62)), "implausible GGUF string length"),
        (_raw(n_tensors=1, kv=_key("t") + struct.pack("<I", 1000)), "dimensions"),
        (_raw(n_tensors=1, kv=_key("t") + struct.pack("<IQIQ", 1, 32, 77, 0)), "unknown ggml tensor type 77"),
    ],
    ids=["magic", "empty", "v1", "v4", "value-type", "array-type", "string-length", "dims", "tensor-type"],
)
def test_bad_headers_raise_clear_errors(data, message):
    with pytest.raises(GGUFFormatError, match=message):
        read_gguf_header(io.BytesIO(data))


def test_big_endian_is_refused_clearly(tmp_path):
    path = write_small(tmp_path / "be.gguf", endianess=gguf.GGUFEndian.BIG)
    with pytest.raises(GGUFFormatError, match="big-endian"):
        read_gguf_header(path)


def test_truncation_anywhere_in_the_header_is_a_format_error(small):
    data = small.read_bytes()
    end = read_gguf_header(small).bytes_read
    for cut in range(0, end, 7):
        for source in (io.BytesIO(data[:cut]), _NoSeek(data[:cut])):
            with pytest.raises(GGUFFormatError, match="truncated|bad magic"):
                read_gguf_header(source)
    assert read_gguf_header(io.BytesIO(data[:end])).tensors  # the header alone is enough: no tensor data needed


def test_split_gguf_parts(tmp_path):
    names = [f"m-{i:05d}-of-00003.gguf" for i in (1, 2, 3)]
    for name in names[::-1]:
        (tmp_path / name).touch()
    assert split_gguf_parts(tmp_path / names[1]) == [tmp_path / n for n in names]
    (tmp_path / names[2]).unlink()
    assert split_gguf_parts(str(tmp_path / names[0])) == [tmp_path / n for n in names[:2]]
    assert split_gguf_parts(tmp_path / "plain.gguf") == [tmp_path / "plain.gguf"]
    assert split_gguf_parts(tmp_path / "m-00004-of-00003x.gguf") == [tmp_path / "m-00004-of-00003x.gguf"]


def test_llama3_8b_shaped_header_is_read_fast(tmp_path, capsys):
    path = write_sparse_llama(tmp_path / "8b.gguf", **LLAMA3_8B)
    started = time.perf_counter()
    header = read_gguf_header(path)
    elapsed = time.perf_counter() - started
    with capsys.disabled():
        print(f"\nread_gguf_header on an 8B-shaped file ({header.bytes_read / 1e6:.1f} MB of header): {elapsed:.3f} s")

    assert header.metadata["tokenizer.ggml.tokens"] == ArrayInfo(int(V.STRING), 128256)
    assert isinstance(header.metadata["tokenizer.ggml.merges"], list | ArrayInfo)
    assert header.metadata["tokenizer.ggml.token_type"] == ArrayInfo(int(V.INT32), 128256)
    assert header.arch_get("block_count") == 32 and header.arch_get("embedding_length") == 4096
    assert header.arch_get("attention.head_count") == 32 and header.arch_get("attention.head_count_kv") == 8
    assert len(header.tensors) == 2 + 9 * 32 + 1
    tensors = {t.name: t for t in header.tensors}
    assert tensors["token_embd.weight"].shape == (4096, 128256)
    assert tensors["output.weight"].n_bytes == 4096 * 128256 // 256 * 210  # Q6_K: 210 bytes per 256
    assert tensors["blk.0.ffn_gate.weight"].n_bytes == 4096 * 14336 // 256 * 144  # Q4_K: 144 bytes per 256
    last = max(header.tensors, key=lambda t: t.offset)
    assert path.stat().st_size == header.data_offset + last.offset + -(-last.n_bytes // 32) * 32
