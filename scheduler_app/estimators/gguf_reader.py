"""A fast GGUF header reader: metadata and tensor infos, never tensor data, never big arrays in memory.

gguf.GGUFReader materialises every tokenizer string (~7.7 s on an 8B-shaped file); this reader skips
arrays it does not need, so it reads the same numbers in a small fraction of that, from a file or any
sequential binary stream (e.g. HTTP range reads).
"""

from __future__ import annotations

import io
import os
import struct
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
SMALL_ARRAY = 64  # arrays up to this many scalars are kept in full (e.g. per-layer head counts)
MAX_STRING = 64 << 20  # real strings (chat templates) are KBs: a bigger length is corruption, not a 2^60-byte read
MAX_DIMS = 8  # ggml has 4; anything far beyond is a corrupt tensor info

# value type id -> struct format (scalars); 8 = string, 9 = array
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


class GGUFFormatError(ValueError):
    """The bytes are not a GGUF header we can read."""


@dataclass(frozen=True)
class ArrayInfo:
    """A big array that was skipped: its element type and length only."""

    element_type: int
    length: int

    def __len__(self) -> int:
        return self.length


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int
    n_bytes: int


@dataclass
class GGUFHeader:
    version: int
    metadata: dict[str, Any] = field(default_factory=dict)
    tensors: list[TensorInfo] = field(default_factory=list)
    data_offset: int = 0
    alignment: int = DEFAULT_ALIGNMENT
    bytes_read: int = 0

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def arch_get(self, suffix: str, default: Any = None) -> Any:
        return self.metadata.get(f"{self.architecture}.{suffix}", default)


class _Stream:
    """Counts bytes and skips forward by seeking when the source can, else by reading."""

    def __init__(self, raw: BinaryIO):
        self.raw = raw
        self.seekable = bool(getattr(raw, "seekable", lambda: False)())
        self.position = raw.tell() if self.seekable else 0

    def read(self, n: int) -> bytes:
        data = self.raw.read(n)
        while len(data) < n:  # raw streams (sockets, RawIOBase) may return short reads before EOF
            more = self.raw.read(n - len(data))
            if not more:
                raise GGUFFormatError(f"truncated GGUF header at byte {self.position} (wanted {n}, got {len(data)})")
            data += more
        self.position += n
        return data

    def unpack(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.read(struct.calcsize(fmt)))[0]

    def skip(self, n: int) -> None:
        if self.seekable:
            self.raw.seek(n, io.SEEK_CUR)
            self.position += n
            return
        while n > 0:
            chunk = self.read(min(n, 1 << 20))
            n -= len(chunk)

    def skip_strings(self, count: int) -> None:
        """Walk `count` length-prefixed strings in big chunks (a vocabulary has ~150k of them)."""
        if not self.seekable:
            for _ in range(count):
                self.skip(self.unpack("<Q"))
            return
        buf, pos, unpack_from = b"", 0, struct.Struct("<Q").unpack_from
        for _ in range(count):
            if pos + 8 > len(buf):
                buf, pos = buf[pos:], 0
            while len(buf) < 8:  # a loop, as raw streams may return fewer bytes than asked
                more = self.raw.read(1 << 20)
                if not more:
                    raise GGUFFormatError(f"truncated GGUF string array near byte {self.position}")
                buf += more
            end = pos + 8 + _check_length(unpack_from(buf, pos)[0], self.position)
            while end > len(buf):
                more = self.raw.read(max(1 << 20, end - len(buf)))
                if not more:
                    raise GGUFFormatError(f"truncated GGUF string array near byte {self.position}")
                buf += more
            self.position += end - pos
            pos = end
        self.raw.seek(pos - len(buf), io.SEEK_CUR)  # give back what was read past the array

    def string(self) -> str:
        return self.read(_check_length(self.unpack("<Q"), self.position)).decode("utf-8", "replace")


def _check_length(length: int, position: int) -> int:
    if length > MAX_STRING:
        raise GGUFFormatError(f"implausible GGUF string length {length} near byte {position} (corrupt header?)")
    return length


def _value(stream: _Stream, value_type: int) -> Any:
    if value_type in _SCALARS:
        return stream.unpack(_SCALARS[value_type])
    if value_type == _STRING:
        return stream.string()
    if value_type == _ARRAY:
        element_type = stream.unpack("<I")
        length = stream.unpack("<Q")
        return _array(stream, element_type, length)
    raise GGUFFormatError(f"unknown GGUF value type {value_type} at byte {stream.position}")


def _array(stream: _Stream, element_type: int, length: int) -> Any:
    if element_type in _SCALARS:
        size = struct.calcsize(_SCALARS[element_type])
        if length <= SMALL_ARRAY:
            return list(struct.unpack(f"<{length}{_SCALARS[element_type][1]}", stream.read(size * length)))
        stream.skip(size * length)
        return ArrayInfo(element_type, length)
    if element_type == _STRING:
        if length <= SMALL_ARRAY:
            return [stream.string() for _ in range(length)]
        stream.skip_strings(length)
        return ArrayInfo(element_type, length)
    if element_type == _ARRAY:  # rare (nested arrays): read through, keep only small ones
        items = [_value(stream, _ARRAY) for _ in range(length)]
        return items if length <= SMALL_ARRAY else ArrayInfo(element_type, length)
    raise GGUFFormatError(f"unknown GGUF array element type {element_type}")


def tensor_bytes(shape: tuple[int, ...], ggml_type: int) -> int:
    try:
        block_size, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    except (ValueError, KeyError):
        raise GGUFFormatError(f"unknown ggml tensor type {ggml_type}") from None
    n_elements = 1
    for dim in shape:
        n_elements *= dim
    return n_elements // block_size * type_size


def read_gguf_header(source: str | os.PathLike | BinaryIO) -> GGUFHeader:
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb", buffering=1 << 20) as f:
            return read_gguf_header(f)
    stream = _Stream(source)
    if stream.read(4) != GGUF_MAGIC:
        raise GGUFFormatError("not a GGUF file (bad magic)")
    version = stream.unpack("<I")
    if version not in (2, 3):
        if version.to_bytes(4, "little")[::-1] in ((2).to_bytes(4, "little"), (3).to_bytes(4, "little")):
            raise GGUFFormatError("big-endian GGUF files are not supported")
        raise GGUFFormatError(f"unsupported GGUF version {version}")
    n_tensors = stream.unpack("<Q")
    n_kv = stream.unpack("<Q")
    header = GGUFHeader(version=version)
    for _ in range(n_kv):
        key = stream.string()
        header.metadata[key] = _value(stream, stream.unpack("<I"))
    for _ in range(n_tensors):
        name = stream.string()
        n_dims = stream.unpack("<I")
        if n_dims > MAX_DIMS:
            raise GGUFFormatError(f"tensor {name!r} has {n_dims} dimensions (corrupt header?)")
        shape = tuple(stream.unpack("<Q") for _ in range(n_dims))
        ggml_type = stream.unpack("<I")
        offset = stream.unpack("<Q")
        header.tensors.append(TensorInfo(name, shape, ggml_type, offset, tensor_bytes(shape, ggml_type)))
    header.alignment = int(header.metadata.get("general.alignment", DEFAULT_ALIGNMENT))
    header.data_offset = -(-stream.position // header.alignment) * header.alignment
    header.bytes_read = stream.position
    return header
