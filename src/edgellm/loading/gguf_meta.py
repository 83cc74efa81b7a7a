"""Read a GGUF file's header, key/value metadata and tensor directory without gguf.GGUFReader.

GGUFReader builds a numpy view per scalar (~3 s for a 49k-token vocabulary); this parser walks the
header once with `struct` over one read-only `np.memmap` (~0.1 s) and hands out tensor data as plain
numpy views of the same map. Layout (GGUF v2/v3, https://github.com/ggml-org/ggml/blob/master/docs/gguf.md):

    magic "GGUF" | u32 version | u64 n_tensors | u64 n_kv
    n_kv x (string key, u32 value type, value)              string = u64 length + UTF-8 bytes
    n_tensors x (string name, u32 n_dims, n_dims x u64 ne, u32 ggml type, u64 offset)
    padding to `general.alignment` (default 32), then the tensor data (offsets relative to its start)
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from ..errors import CorruptCheckpointError, UnsupportedModelError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)  # v1 used 32-bit lengths and is long obsolete
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS

# GGUF value type id -> struct code. 8 = string, 9 = array.
_SCALAR_CODES = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
# ggml type id -> (elements per block, bytes per block)
_BLOCK_SIZES = {int(t): sizes for t, sizes in GGML_QUANT_SIZES.items()}


def ggml_type_name(ggml_type: int) -> str:
    try:
        return GGMLQuantizationType(ggml_type).name
    except ValueError:
        return f"type#{ggml_type}"


@dataclass(frozen=True)
class TensorInfo:
    """One entry of the tensor directory."""

    name: str
    shape: tuple[int, ...]  # numpy/PyTorch order (rows first): GGML's ne[] reversed
    ggml_type: int
    offset: int             # absolute byte offset of the data in the file
    n_bytes: int

    @property
    def type_name(self) -> str:
        return ggml_type_name(self.ggml_type)

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1


class _Truncated(Exception):
    """Internal: a read ran past the end of the file (turned into CorruptCheckpointError with context)."""


class _Parser:
    """A cursor over the mapped bytes; `where` names the part being read, for error messages."""

    def __init__(self, buf: memoryview, order: str) -> None:
        self.buf = buf
        self.size = len(buf)
        self.pos = 0
        self.order = order
        self.u32 = struct.Struct(order + "I")
        self.u64 = struct.Struct(order + "Q")

    def need(self, n: int) -> int:
        end = self.pos + n
        if end > self.size:
            raise _Truncated
        return end

    def read_u32(self) -> int:
        end = self.need(4)
        (v,) = self.u32.unpack_from(self.buf, self.pos)
        self.pos = end
        return v

    def read_u64(self) -> int:
        end = self.need(8)
        (v,) = self.u64.unpack_from(self.buf, self.pos)
        self.pos = end
        return v

    def read_str(self) -> str:
        n = self.read_u64()
        end = self.need(n)
        s = str(self.buf[self.pos:end], "utf-8")
        self.pos = end
        return s

    def read_value(self, vtype: int) -> Any:
        code = _SCALAR_CODES.get(vtype)
        if code is not None:
            end = self.need(struct.calcsize(code))
            (v,) = struct.unpack_from(self.order + code, self.buf, self.pos)
            self.pos = end
            return v
        if vtype == _STRING:
            return self.read_str()
        if vtype == _ARRAY:
            return self.read_array()
        raise ValueError(f"unknown value type {vtype}")

    def read_array(self) -> list[Any]:
        itype = self.read_u32()
        n = self.read_u64()
        code = _SCALAR_CODES.get(itype)
        if code is not None:  # numeric arrays in one numpy call
            dtype = np.dtype(code).newbyteorder(self.order)
            end = self.need(n * dtype.itemsize)
            values = np.frombuffer(self.buf, dtype=dtype, count=n, offset=self.pos).tolist()
            self.pos = end
            return values
        if itype == _STRING:
            return self._read_str_array(n)
        if itype == _ARRAY:
            self.need(n * 12)  # each nested array has at least a type and a length
            return [self.read_array() for _ in range(n)]
        raise ValueError(f"unknown array element type {itype}")

    def _read_str_array(self, n: int) -> list[str]:
        # The hot loop (vocabularies, merges: ~100k strings), kept free of method calls.
        buf, size, pos = self.buf, self.size, self.pos
        if pos + 8 * n > size:
            raise _Truncated
        unpack = self.u64.unpack_from
        out: list[str] = [""] * n
        for i in range(n):
            (ln,) = unpack(buf, pos)
            pos += 8
            end = pos + ln
            if end > size:
                raise _Truncated
            out[i] = str(buf[pos:end], "utf-8")
            pos = end
        self.pos = pos
        return out


class GGUFFile:
    """A parsed GGUF file: `.metadata` (plain Python values), `.tensors` (name -> TensorInfo), and
    `.data(name)` giving a tensor's bytes as a read-only uint8 view of one memory map of the file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            if self.path.stat().st_size == 0:
                raise self._error("empty file, not a GGUF file")
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        except ValueError as e:  # numpy refuses to map an empty file
            raise self._error(f"not a GGUF file ({e})") from e
        except OSError as e:
            raise self._error(f"cannot open ({e.strerror or e})") from e
        self.file_size = int(self._map.shape[0])
        self._bytes = self._map.view(np.ndarray)  # plain ndarray: slicing a memmap subclass is slow
        self.metadata: dict[str, Any] = {}
        self.tensors: dict[str, TensorInfo] = {}
        self._parse(memoryview(self._bytes))

    def drop_pages(self) -> None:
        """Take the file pages read so far out of this process's resident set (they stay in the page cache
        and come back on the next read). Loading reads every tensor once; without this the whole file
        (~100 MB for the default model) stays resident until the map is closed."""
        mm = getattr(self._map, "_mmap", None)
        if mm is not None and hasattr(mm, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
            mm.madvise(mmap.MADV_DONTNEED)

    def _error(self, what: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"{self.path}: {what}")

    def _truncated(self, where: str) -> CorruptCheckpointError:
        return self._error(f"truncated GGUF file: ends inside {where} (file has {self.file_size} bytes)")

    def _parse(self, buf: memoryview) -> None:
        if self.file_size < 4 and GGUF_MAGIC.startswith(bytes(buf)):
            raise self._truncated("the magic number")
        if bytes(buf[:4]) != GGUF_MAGIC:
            raise self._error(f"not a GGUF file (magic {bytes(buf[:4])!r}, expected {GGUF_MAGIC!r})")
        p = _Parser(buf, "<")
        p.pos = 4
        where = "the header"
        try:
            version = p.read_u32()
            if version & 0xFFFF == 0 and version != 0:  # written on a big-endian machine
                p = _Parser(buf, ">")
                p.pos = 4
                version = p.read_u32()
            if version not in SUPPORTED_VERSIONS:
                raise self._error(f"unsupported GGUF version {version} (supported: 2, 3)")
            self.version = version
            self.byte_order = p.order
            # Absurd counts need no check up front: every entry reads bytes, so the loops stop at the end.
            n_tensors, n_kv = p.read_u64(), p.read_u64()
            for i in range(n_kv):
                where = f"metadata entry #{i}"
                key = p.read_str()
                where = f"metadata value {key!r}"
                vtype = p.read_u32()
                value = p.read_value(vtype)
                if key in self.metadata:
                    raise self._error(f"duplicate metadata key {key!r}")
                self.metadata[key] = value
            alignment = self._alignment()
            self.directory_offset = p.pos  # where the tensor directory starts (for diagnostics)
            entries = []
            for i in range(n_tensors):
                where = f"tensor directory entry #{i}"
                name = p.read_str()
                where = f"tensor directory entry {name!r}"
                n_dims = p.read_u32()
                if n_dims > MAX_DIMS:
                    raise self._error(f"tensor {name!r} has {n_dims} dimensions (at most {MAX_DIMS})")
                ne = [p.read_u64() for _ in range(n_dims)]
                ggml_type = p.read_u32()
                offset = p.read_u64()
                entries.append((name, ne, ggml_type, offset))
        except (_Truncated, struct.error):  # struct.error: the string loop's unchecked length reads
            raise self._truncated(where) from None
        except UnicodeDecodeError as e:
            raise self._error(f"invalid UTF-8 in {where} ({e.reason})") from None
        except ValueError as e:  # unknown value type
            raise self._error(f"malformed {where}: {e}") from None
        self.alignment = alignment
        self.data_offset = -(-p.pos // alignment) * alignment
        for name, ne, ggml_type, offset in entries:
            self._add_tensor(name, ne, ggml_type, offset)

    def _alignment(self) -> int:
        align = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if type(align) is not int or align <= 0 or align & (align - 1):
            raise self._error(f"general.alignment must be a power-of-two integer, got {align!r}")
        return align

    def _add_tensor(self, name: str, ne: list[int], ggml_type: int, offset: int) -> None:
        if name in self.tensors:
            raise self._error(f"duplicate tensor {name!r}")
        if ggml_type not in _BLOCK_SIZES:
            raise self._error(f"tensor {name!r} has unknown ggml type id {ggml_type}")
        block, type_size = _BLOCK_SIZES[ggml_type]
        if ne and ne[0] % block:
            raise self._error(f"tensor {name!r}: row length {ne[0]} is not a multiple of the "
                              f"{ggml_type_name(ggml_type)} block size {block}")
        if offset % self.alignment:
            raise self._error(f"tensor {name!r}: data offset {offset} is not a multiple of {self.alignment}")
        n_elements = int(np.prod(ne, dtype=object)) if ne else 1
        n_bytes = n_elements // block * type_size
        start = self.data_offset + offset
        if start + n_bytes > self.file_size:
            raise self._truncated(f"the tensor data of {name!r} (bytes {start}..{start + n_bytes})")
        self.tensors[name] = TensorInfo(name, tuple(int(d) for d in reversed(ne)), ggml_type, start, n_bytes)

    def data(self, name: str) -> np.ndarray:
        """The raw bytes of tensor `name` (read-only uint8 view of the file map, no copy)."""
        if self.byte_order != "<":
            raise UnsupportedModelError(f"{self.path}: big-endian GGUF tensor data is not supported")
        t = self.tensors[name]
        return self._bytes[t.offset:t.offset + t.n_bytes]


def open_gguf(path: str | Path) -> GGUFFile:
    """Parse a GGUF file's header, metadata and tensor directory; a truncated or malformed file raises
    CorruptCheckpointError (one line, naming the file and what is wrong)."""
    return GGUFFile(path)


def read_metadata(reader: Any) -> dict[str, Any]:
    """Every metadata field as str/int/float/bool or a list of those (strings decoded as UTF-8).

    Takes a GGUFFile (from `open_gguf`) or, for older callers, a gguf.GGUFReader."""
    if isinstance(reader, GGUFFile):
        return dict(reader.metadata)
    out: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            out[key] = field.contents()
        except Exception as e:
            raise CorruptCheckpointError(f"GGUF metadata field {key!r} is unreadable: {e}") from e
    return out
