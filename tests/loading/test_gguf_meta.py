"""Our GGUF header/metadata parser (edgellm.loading.gguf_meta) against gguf.GGUFReader, and its errors."""

from __future__ import annotations

import time
from pathlib import Path

import gguf
import numpy as np
import pytest

import edgellm
from edgellm.errors import CorruptCheckpointError
from edgellm.loading.gguf_meta import GGUFFile, open_gguf, read_metadata

Q = gguf.GGMLQuantizationType


def reader_metadata(reader: gguf.GGUFReader) -> dict:
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def assert_same_as_reader(ours: GGUFFile, path: Path) -> None:
    """Same keys in the same order, same values and Python types; same tensor directory and bytes."""
    reader = gguf.GGUFReader(str(path))
    expected = reader_metadata(reader)
    got = read_metadata(ours)
    assert list(got) == list(expected)
    for key, value in expected.items():
        assert got[key] == value, key
        assert type(got[key]) is type(value), key
        if isinstance(value, list):
            assert [type(v) for v in got[key]] == [type(v) for v in value], key
    assert list(ours.tensors) == [t.name for t in reader.tensors]
    for t in reader.tensors:
        info = ours.tensors[t.name]
        assert info.shape == tuple(reversed(t.shape.tolist()))
        assert info.ggml_type == int(t.tensor_type) and info.type_name == t.tensor_type.name
        assert (info.offset, info.n_bytes) == (t.data_offset, t.n_bytes)
        np.testing.assert_array_equal(ours.data(t.name), np.asarray(t.data).reshape(-1).view(np.uint8))


# ---------------------------------------------------------------- the real default model
def test_default_model_matches_gguf_reader(default_gguf):
    ours = open_gguf(default_gguf)
    assert ours.version == 3 and ours.alignment == 32
    assert len(ours.metadata["tokenizer.ggml.tokens"]) == 49152
    assert_same_as_reader(ours, default_gguf)


def test_default_model_parses_fast(default_gguf):
    """GGUFReader needs ~3 s of CPU for the 49k-token vocabulary; we need ~0.05 s (CPU time: the box is shared)."""
    open_gguf(default_gguf)  # warm the page cache
    start = time.process_time()
    open_gguf(default_gguf)
    assert time.process_time() - start < 1.0


# ---------------------------------------------------------------- synthetic files
ALL_VALUES = {
    "t.u8": (np.uint8(200), gguf.GGUFValueType.UINT8), "t.i8": (np.int8(-100), gguf.GGUFValueType.INT8),
    "t.u16": (np.uint16(60000), gguf.GGUFValueType.UINT16), "t.i16": (np.int16(-30000), gguf.GGUFValueType.INT16),
    "t.u32": (4_000_000_000, gguf.GGUFValueType.UINT32), "t.i32": (-2_000_000_000, gguf.GGUFValueType.INT32),
    "t.u64": (2**63 + 5, gguf.GGUFValueType.UINT64), "t.i64": (-(2**62), gguf.GGUFValueType.INT64),
    "t.f32": (0.1, gguf.GGUFValueType.FLOAT32), "t.f64": (0.1, gguf.GGUFValueType.FLOAT64),
    "t.bool": (True, gguf.GGUFValueType.BOOL), "t.str": ("héllo ✓ \x00 end", gguf.GGUFValueType.STRING),
    "t.empty_str": ("", gguf.GGUFValueType.STRING),
}
ARRAYS = {
    "a.u8": ([1, 2, 255], gguf.GGUFValueType.UINT8), "a.i16": ([-1, 2], gguf.GGUFValueType.INT16),
    "a.i32": ([-5, 0, 7], gguf.GGUFValueType.INT32), "a.u64": ([1, 2**64 - 1], gguf.GGUFValueType.UINT64),
    "a.f32": ([0.5, -1.25, 3.0e-8], gguf.GGUFValueType.FLOAT32), "a.f64": ([0.1, 1e300], gguf.GGUFValueType.FLOAT64),
    "a.bool": ([True, False, True], gguf.GGUFValueType.BOOL),
    "a.str": (["a", "", "Ġthe", "日本語", "x" * 1000], gguf.GGUFValueType.STRING),
}


def write_gguf(path: Path, *, alignment: int | None = None, big_endian: bool = False, n_tensors: int = 3) -> Path:
    w = gguf.GGUFWriter(str(path), "llama",
                        endianess=gguf.GGUFEndian.BIG if big_endian else gguf.GGUFEndian.LITTLE)
    if alignment:
        w.add_custom_alignment(alignment)
    for key, (value, vtype) in ALL_VALUES.items():
        w.add_key_value(key, value, vtype)
    for key, (value, sub) in ARRAYS.items():
        w.add_key_value(key, value, gguf.GGUFValueType.ARRAY, sub_type=sub)
    rng = np.random.default_rng(0)
    if n_tensors:
        w.add_tensor("f32", rng.standard_normal((3, 5)).astype(np.float32))
        w.add_tensor("q8", gguf.quants.quantize(rng.standard_normal((2, 64)).astype(np.float32), Q.Q8_0),
                     raw_dtype=Q.Q8_0)
        w.add_tensor("vec", rng.standard_normal(7).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_all_value_types_match_gguf_reader(tmp_path):
    path = write_gguf(tmp_path / "all.gguf")
    ours = open_gguf(path)
    assert_same_as_reader(ours, path)
    assert ours.metadata["t.u64"] == 2**63 + 5 and ours.metadata["t.str"] == "héllo ✓ \x00 end"
    assert ours.metadata["a.str"][3] == "日本語" and ours.metadata["t.f32"] == float(np.float32(0.1))


def test_nested_arrays(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "n.gguf"), "llama")
    w.add_array("nested.ints", [[1, 2], [3], [4, 5, 6]])
    w.add_array("nested.strs", [["a", "b"], ["c"]])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    meta = open_gguf(tmp_path / "n.gguf").metadata
    assert meta["nested.ints"] == [[1, 2], [3], [4, 5, 6]]  # GGUFReader flattens these; we keep the nesting
    assert meta["nested.strs"] == [["a", "b"], ["c"]]


def test_custom_alignment(tmp_path):
    path = write_gguf(tmp_path / "a64.gguf", alignment=64)
    ours = open_gguf(path)
    assert ours.alignment == 64 and ours.data_offset % 64 == 0
    assert all(t.offset % 64 == 0 for t in ours.tensors.values())
    assert_same_as_reader(ours, path)


def test_big_endian_metadata(tmp_path):
    little = open_gguf(write_gguf(tmp_path / "le.gguf"))
    big = open_gguf(write_gguf(tmp_path / "be.gguf", big_endian=True))
    assert big.byte_order == ">" and big.metadata == little.metadata
    assert {n: (t.shape, t.ggml_type, t.n_bytes) for n, t in big.tensors.items()} == \
        {n: (t.shape, t.ggml_type, t.n_bytes) for n, t in little.tensors.items()}


def test_version_2_is_read(tmp_path):
    path = write_gguf(tmp_path / "v2.gguf")
    data = bytearray(path.read_bytes())
    data[4:8] = (2).to_bytes(4, "little")  # v2 and v3 share the little-endian layout
    path.write_bytes(bytes(data))
    ours = open_gguf(path)
    assert ours.version == 2
    assert_same_as_reader(ours, path)


# ---------------------------------------------------------------- errors
def expect_corrupt(path: Path, *words: str) -> str:
    with pytest.raises(CorruptCheckpointError) as info:
        open_gguf(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message, message
    for word in words:
        assert word in message, message
    return message


@pytest.mark.parametrize("version", [1, 4, 0x12345])
def test_unsupported_version(tmp_path, version):
    path = write_gguf(tmp_path / "v.gguf")
    data = bytearray(path.read_bytes())
    data[4:8] = version.to_bytes(4, "little")
    path.write_bytes(bytes(data))
    expect_corrupt(path, f"unsupported GGUF version {version}")


def test_not_gguf(tmp_path):
    for name, content in (("bad.gguf", b"PK\x03\x04 this is a zip"), ("short.gguf", b"GG"), ("empty.gguf", b"")):
        path = tmp_path / name
        path.write_bytes(content)
        expect_corrupt(path, "GGUF")
    expect_corrupt(tmp_path / "bad.gguf", "not a GGUF file", "magic")


def test_truncated_anywhere(tmp_path):
    """Every cut before the end of the last tensor's data raises, naming the part that is cut."""
    path = write_gguf(tmp_path / "full.gguf")
    full = path.read_bytes()
    ours = open_gguf(path)
    data_end = max(t.offset + t.n_bytes for t in ours.tensors.values())
    # directory entry: u64 name length, name, u32 n_dims, n_dims x u64, u32 type, u64 offset
    directory_end = ours.directory_offset + sum(8 + len(n) + 4 + 8 * len(t.shape) + 4 + 8
                                                for n, t in ours.tensors.items())
    cut_path = tmp_path / "cut.gguf"
    seen = set()
    for cut in range(1, data_end):
        cut_path.write_bytes(full[:cut])
        message = expect_corrupt(cut_path)
        where = ("magic" if cut < 4 else "header" if cut < 24 else "metadata" if cut < ours.directory_offset
                 else "tensor directory" if cut < directory_end else "tensor data")
        assert where in message, (cut, message)
        seen.add(where)
    assert seen == {"magic", "header", "metadata", "tensor directory", "tensor data"}
    cut_path.write_bytes(full[:data_end])  # only the trailing padding missing: the data is all there
    open_gguf(cut_path)


def test_malformed_entries(tmp_path):
    path = write_gguf(tmp_path / "m.gguf")
    full = bytearray(path.read_bytes())
    key = full.index(b"t.u8")
    bad_type = bytearray(full)
    bad_type[key + 4:key + 8] = (99).to_bytes(4, "little")  # value type of the first key
    (tmp_path / "type.gguf").write_bytes(bytes(bad_type))
    expect_corrupt(tmp_path / "type.gguf", "unknown value type 99")
    bad_utf8 = bytearray(full)
    bad_utf8[key:key + 2] = b"\xff\xfe"
    (tmp_path / "utf8.gguf").write_bytes(bytes(bad_utf8))
    expect_corrupt(tmp_path / "utf8.gguf", "UTF-8")
    huge = bytearray(full)
    huge[8:16] = (2**60).to_bytes(8, "little")  # tensor count
    (tmp_path / "count.gguf").write_bytes(bytes(huge))
    expect_corrupt(tmp_path / "count.gguf", "truncated")


def test_truncated_default_model_through_load(default_gguf, tmp_path):
    """edgellm.load reports a cut-off download as CorruptCheckpointError naming the file."""
    data = default_gguf.read_bytes()
    for cut, where in ((1_000_000, "metadata"), (len(data) - 1_000_000, "tensor data")):
        path = tmp_path / f"cut{cut}.gguf"
        path.write_bytes(data[:cut])
        with pytest.raises(CorruptCheckpointError, match=where) as info:
            edgellm.load(path)
        assert str(path) in str(info.value) and "\n" not in str(info.value)
