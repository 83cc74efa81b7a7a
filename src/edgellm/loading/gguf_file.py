"""Load a llama.cpp GGUF file: config and tokenizer from metadata; weights either kept in their Q4_0/Q4_1/Q8_0
blocks (repacked for our int8-activation kernel, `keep_quantized=True`: what `--dtype auto` does) or dequantized
tensor by tensor."""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import gguf
import numpy as np
import torch

from ..config import ModelConfig
from ..errors import CorruptCheckpointError, UnsupportedModelError
from ..kernels import blockq
from ..kernels.blocklinear import BlockWeight
from .gguf_meta import GGUFFile, TensorInfo, ggml_type_name, open_gguf

# Weight types we read. F32/F16/BF16/Q8_0/Q4_0/Q4_1 are dequantized by our torch code below (bit-exact
# with gguf.quants.dequantize, ~10x faster); the others by the gguf package's numpy reference code.
SUPPORTED_TYPES = {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K",
                   "Q5_K", "Q6_K"}
_Q = gguf.GGMLQuantizationType

_GLOBAL_NAMES = {
    "token_embd.weight": "embed_tokens.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_qkv.weight": "self_attn.qkv_proj.weight",   # phi3: already fused
    "ffn_down.weight": "mlp.down_proj.weight",
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(.+)")


def unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation.

    convert_hf_to_gguf.py reorders each head's rows from HF's half-split RoPE layout (x[:D/2], x[D/2:])
    to GGML's interleaved pairs (x0, x1), (x2, x3)...: reshape(H, 2, D/2).swapaxes(1, 2). We apply the
    inverse so the model can keep HF's rotate_half convention.
    """
    shape = w.shape
    return w.reshape(n_heads, shape[0] // n_heads // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


@contextmanager
def _one_thread() -> Iterator[None]:
    """Run torch ops single-threaded. Dequantizing is a few memory-bound elementwise passes per tensor, and
    OpenMP's spin-waiting turns each multi-threaded pass into a stall when the cores are busy: on a shared
    2-core box the default model's weights took 14 s of CPU with 2 threads against 0.3 s with one."""
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _as_torch(raw: np.ndarray) -> torch.Tensor:
    # The file map is read-only; torch warns about that although we only ever read from these views.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(raw)


def _f16_fields(data: torch.Tensor, block_bytes: int, n_fields: int) -> torch.Tensor:
    """The first `n_fields` fp16 values of every block, as fp32 (n_blocks, n_fields), in one strided op
    (every block size we read is even, so the blocks tile an fp16 view of the bytes)."""
    return data.view(torch.float16).view(-1, block_bytes // 2)[:, :n_fields].float()


def _unpack_nibbles(qs: torch.Tensor, out: torch.Tensor) -> None:
    """GGML's 4-bit layout: the low nibbles of a block's 16 bytes are values 0..15, the high ones 16..31."""
    out.view(-1, 2, 16).copy_(torch.stack((qs, qs >> 4), dim=1) & 0x0F)


# GGML block types that map exactly onto kernels/blockq.py's layouts, by bits: Q4_1 w = d * q + m; Q4_0
# w = d * (q - 8), i.e. m = -8d (exact in fp16); Q8_0 w = d * q. d and m stay fp16, as in the file.
BLOCK_BITS = {_Q.Q4_0: 4, _Q.Q4_1: 4, _Q.Q8_0: 8}


def block_fields(raw: np.ndarray, ggml_type: int, rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A Q4_0/Q4_1/Q8_0 tensor's bytes -> per-row block fields: (codes, d, m). Q4: codes = the 16 nibble bytes
    (rows, nb, 16); Q8: int8 codes (rows, nb, 32), m None. d and m as fp16 (rows, nb)."""
    data = _as_torch(raw).view(rows, -1)
    size = {_Q.Q4_0: 18, _Q.Q4_1: 20, _Q.Q8_0: 34}[ggml_type]
    if data.shape[1] % size:
        raise ValueError(f"{data.shape[1]} bytes per row is not a whole number of {size}-byte blocks")
    b = data.view(rows, -1, size)
    d = b[..., :2].contiguous().view(torch.float16)[..., 0]
    if ggml_type == _Q.Q8_0:
        return b[..., 2:].contiguous().view(torch.int8), d, None
    if ggml_type == _Q.Q4_0:
        return b[..., 2:].contiguous(), d, d * -8
    return b[..., 4:].contiguous(), d, b[..., 2:4].contiguous().view(torch.float16)[..., 0]


DEQUANT_ROWS = 4096  # rows of a big tensor dequantized at a time while loading in bf16/fp16


def dequantize(raw: np.ndarray, ggml_type: int, shape: tuple[int, ...], out: torch.Tensor | None = None
               ) -> torch.Tensor:
    """Dequantize one tensor's raw bytes to fp32 of `shape`, written into `out` (contiguous fp32) if given.

    Same values, bit for bit, as gguf.quants.dequantize: the arithmetic is done in fp32 in the same order
    (d * q, then + m), just vectorised with torch instead of numpy row groups.
    """
    name = ggml_type_name(ggml_type)
    if name not in SUPPORTED_TYPES:
        raise UnsupportedModelError(f"GGUF tensor type {name} is not supported")
    block, type_size = gguf.GGML_QUANT_SIZES[_Q(ggml_type)]
    n_elements = int(np.prod(shape, dtype=np.int64))
    if n_elements % block or raw.nbytes != n_elements // block * type_size:
        raise ValueError(f"{raw.nbytes} bytes of {name} cannot hold a tensor of shape {tuple(shape)}")
    if out is None:
        out = torch.empty(shape, dtype=torch.float32)
    elif tuple(out.shape) != tuple(shape) or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous fp32 tensor of shape {shape}")
    with _one_thread():
        _dequantize_into(_as_torch(raw), raw, ggml_type, shape, out)
    return out


def _dequantize_into(data: torch.Tensor, raw: np.ndarray, ggml_type: int, shape: tuple[int, ...],
                     out: torch.Tensor) -> None:
    if ggml_type == _Q.F32:
        out.view(-1).copy_(data.view(torch.float32))
    elif ggml_type == _Q.F16:
        out.view(-1).copy_(data.view(torch.float16))
    elif ggml_type == _Q.BF16:
        out.view(-1).copy_(data.view(torch.bfloat16))  # exact: bf16 is the top half of an fp32
    elif ggml_type == _Q.Q8_0:  # 34-byte blocks: fp16 d, 32 x int8; x = q * d
        o = out.view(-1, 32)
        o.copy_(data.view(-1, 34)[:, 2:].view(torch.int8))
        o.mul_(_f16_fields(data, 34, 1))
    elif ggml_type == _Q.Q4_0:  # 18-byte blocks: fp16 d, 16 bytes of nibbles; x = (q - 8) * d
        o = out.view(-1, 32)
        _unpack_nibbles(data.view(-1, 18)[:, 2:], o)
        o.sub_(8).mul_(_f16_fields(data, 18, 1))
    elif ggml_type == _Q.Q4_1:  # 20-byte blocks: fp16 d, fp16 m, 16 bytes of nibbles; x = d * q + m
        o = out.view(-1, 32)
        _unpack_nibbles(data.view(-1, 20)[:, 4:], o)
        dm = _f16_fields(data, 20, 2)
        o.mul_(dm[:, :1]).add_(dm[:, 1:])
    else:  # K-quants, Q5_x: the gguf package's numpy code, on (rows, bytes per row)
        rows = raw.reshape(-1, raw.nbytes // max(1, int(np.prod(shape[:-1], dtype=np.int64))))
        out.view(-1).copy_(torch.from_numpy(gguf.quants.dequantize(rows, _Q(ggml_type)).reshape(-1)))


class GGUFCheckpoint:
    """An opened GGUF file: `.config`, `.metadata`, `.file` (the parsed GGUFFile), and `tensors(dtype)`
    yielding our state-dict entries."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.file: GGUFFile = open_gguf(self.path)
        self.metadata = dict(self.file.metadata)
        self.raw: dict[str, TensorInfo] = self.file.tensors
        try:
            self.config = ModelConfig.from_gguf(self.metadata, set(self.raw))
        except (KeyError, TypeError, ZeroDivisionError) as e:
            raise CorruptCheckpointError(f"{self.path}: GGUF metadata is missing a model field ({e})") from e
        if "rope_freqs.weight" in self.raw:
            self.config.rope_freq_factors = self._dequant("rope_freqs.weight").tolist()

    @property
    def reader(self) -> gguf.GGUFReader:
        """The gguf package's reader of the same file, for callers that want it (slow: it parses the whole
        vocabulary into numpy views, ~3 s for a 49k-token one); loading never uses it."""
        return gguf.GGUFReader(str(self.path))

    def _info(self, name: str) -> TensorInfo:
        if name not in self.raw:
            raise CorruptCheckpointError(f"{self.path}: tensor {name!r} is missing")
        return self.raw[name]

    def _dequant(self, name: str, out: torch.Tensor | None = None, rows: tuple[int, int] | None = None
                 ) -> torch.Tensor:
        """Tensor `name` (or its rows r0:r1) as fp32."""
        info = self._info(name)
        raw, shape = self.file.data(name), info.shape
        if rows is not None:
            row_bytes = raw.nbytes // shape[0]
            raw, shape = raw[rows[0] * row_bytes:rows[1] * row_bytes], (rows[1] - rows[0], *shape[1:])
        try:
            return dequantize(raw, info.ggml_type, shape, out)
        except UnsupportedModelError as e:
            raise UnsupportedModelError(f"{self.path}: tensor {name!r}: {e}") from e

    def _weight(self, parts: list[tuple[str, int | None]], dtype: torch.dtype, keep_quantized: bool
                ) -> torch.Tensor | BlockWeight:
        if keep_quantized and len(self._info(parts[0][0]).shape) == 2:
            bw = self._block_weight(parts)
            if bw is not None:
                return bw
        if len(parts) == 1 and parts[0][1] is None:
            return self._get(parts[0][0], dtype)
        return self._fused(parts, dtype)

    def _get(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        info = self._info(name)
        rows = info.shape[0]
        with _one_thread():
            if dtype == torch.float32 or len(info.shape) != 2 or rows <= DEQUANT_ROWS:
                t = self._dequant(name)  # always a fresh tensor, never a view of the file map
                return t if dtype == torch.float32 else t.to(dtype)
            # Big tensors (the 49k-row embedding) go through an fp32 scratch a few thousand rows at a time,
            # so loading never holds a whole fp32 copy next to the final one.
            out = torch.empty(info.shape, dtype=dtype)
            for r in range(0, rows, DEQUANT_ROWS):
                r1 = min(rows, r + DEQUANT_ROWS)
                out[r:r1].copy_(self._dequant(name, rows=(r, r1)))
            return out

    def _block_weight(self, parts: list[tuple[str, int | None]]) -> BlockWeight | None:
        """The rows of these tensors (concatenated, llama q/k un-permuted) kept in their blocks, or None if
        any part is not Q4_0/Q4_1/Q8_0 or the parts mix 4 and 8 bits (then the caller dequantizes)."""
        infos = [self._info(name) for name, _ in parts]
        bits = {BLOCK_BITS.get(i.ggml_type) for i in infos}
        if len(bits) != 1 or None in bits or any(len(i.shape) != 2 for i in infos) or \
                len({i.shape[1] for i in infos}) != 1:
            return None
        fields = []
        for info, (name, heads) in zip(infos, parts, strict=True):
            try:
                f = block_fields(self.file.data(name), info.ggml_type, info.shape[0])
            except ValueError as e:
                raise CorruptCheckpointError(f"{self.path}: tensor {name!r}: {e}") from e
            if heads is not None:
                f = tuple(None if t is None else unpermute_qk(t, heads) for t in f)
            fields.append(f)
        codes, d = torch.cat([f[0] for f in fields]), torch.cat([f[1] for f in fields])
        n, k = codes.shape[0], infos[0].shape[1]
        lanes = blockq.load_lanes()  # the layout this CPU's kernel reads
        if bits == {8}:
            qs, dm = blockq.pack_q8(codes, d, lanes)
        else:
            qs, dm = blockq.pack_q4(codes, d, torch.cat([f[2] for f in fields]), lanes)
        return BlockWeight(bits.pop(), qs, dm, n, k)

    def _fused(self, parts: list[tuple[str, int | None]], dtype: torch.dtype) -> torch.Tensor:
        """Concatenate tensors along rows into one preallocated tensor (no torch.cat copy); a part with a
        head count is un-permuted (llama q/k) on the way."""
        infos = [self._info(name) for name, _ in parts]
        cols = {info.shape[1:] for info in infos}
        if len(cols) != 1:
            shapes = ", ".join(f"{i.name} {i.shape}" for i in infos)
            raise CorruptCheckpointError(f"{self.path}: cannot fuse tensors of different widths: {shapes}")
        out = torch.empty((sum(i.shape[0] for i in infos), *cols.pop()), dtype=dtype)
        with _one_thread():
            self._fill(out, infos, parts)
        return out

    def _fill(self, out: torch.Tensor, infos: list[TensorInfo], parts: list[tuple[str, int | None]]) -> None:
        dtype, row = out.dtype, 0
        for info, (name, heads) in zip(infos, parts, strict=True):
            dst = out[row:row + info.shape[0]]
            row += info.shape[0]
            if heads is None and dtype == torch.float32:
                self._dequant(name, dst)  # straight into the fused tensor
            else:
                t = self._dequant(name)
                if heads is not None:
                    if info.shape[0] % (2 * heads):
                        raise CorruptCheckpointError(
                            f"{self.path}: {name} has {info.shape[0]} rows, not divisible into {heads} heads")
                    t = unpermute_qk(t, heads)
                dst.copy_(t)  # rounds to `dtype` once, from the exact fp32 values

    def tensors(self, dtype: torch.dtype, keep_quantized: bool = False
                ) -> Iterator[tuple[str, torch.Tensor | BlockWeight]]:
        """Our state-dict entries in `dtype`; with keep_quantized, 2-D Q4_0/Q4_1/Q8_0 weights come as BlockWeight."""
        cfg = self.config

        def get(name: str) -> torch.Tensor | BlockWeight:
            return fused([(name, None)])

        def fused(parts: list[tuple[str, int | None]]) -> torch.Tensor | BlockWeight:
            return self._weight(parts, dtype, keep_quantized)

        permute = cfg.arch == "llama"  # llama.cpp permutes q/k only for LLAMA-arch (incl. Mistral) files
        q_heads, k_heads = (cfg.num_heads, cfg.num_kv_heads) if permute else (None, None)
        for src, dst in _GLOBAL_NAMES.items():
            if src in self.raw:
                yield dst, get(src)
        for i in range(cfg.num_layers):
            self.file.drop_pages()  # the previous layer's bytes are consumed
            p = f"blk.{i}."
            for src, dst in _LAYER_NAMES.items():
                if p + src in self.raw:
                    yield f"layers.{i}.{dst}", get(p + src)
            if p + "attn_q.weight" in self.raw:
                yield f"layers.{i}.self_attn.qkv_proj.weight", fused(
                    [(p + "attn_q.weight", q_heads), (p + "attn_k.weight", k_heads), (p + "attn_v.weight", None)])
                if cfg.attention_bias:
                    yield f"layers.{i}.self_attn.qkv_proj.bias", self._fused(
                        [(p + "attn_q.bias", q_heads), (p + "attn_k.bias", k_heads), (p + "attn_v.bias", None)],
                        dtype)
            elif cfg.attention_bias and p + "attn_qkv.bias" in self.raw:
                yield f"layers.{i}.self_attn.qkv_proj.bias", self._get(p + "attn_qkv.bias", dtype)
            if p + "ffn_gate.weight" in self.raw:
                yield f"layers.{i}.mlp.gate_up_proj.weight", fused(
                    [(p + "ffn_gate.weight", None), (p + "ffn_up.weight", None)])
            else:  # phi3 stores [gate; up] fused in ffn_up
                yield f"layers.{i}.mlp.gate_up_proj.weight", get(p + "ffn_up.weight")
        self.file.drop_pages()
        known = set(_GLOBAL_NAMES) | {"rope_freqs.weight"}
        for name in self.raw:
            m = _LAYER_RE.match(name)
            if name not in known and not (m and int(m.group(1)) < cfg.num_layers):
                raise UnsupportedModelError(f"{self.path}: unexpected tensor {name!r} for {cfg.arch}")
