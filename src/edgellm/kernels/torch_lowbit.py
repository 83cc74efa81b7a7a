"""Thin wrappers over torch's CPU low-bit matmul kernels, with availability probes and layout helpers.

- int4: `aten._convert_weight_to_int4pack_for_cpu(int32 (N, K) codes 0..15)` -> uint8 (N, K/2) in a
  layout private to the torch version, consumed by `aten._weight_int4pack_mm_for_cpu(x, packed, G, sz)`.
  That kernel computes w = (q - 8) * scale + zero with `sz[k // G, n] = (scale, zero)`, so an AutoAWQ
  integer zero point z becomes the float zero `(8 - z) * scale`. It needs N % 16 == 0, K % G == 0 and
  G in {32, 64, 128, 256}; we pad N to a multiple of 64 and K to a multiple of the kernel group.
- int8: `aten._weight_int8pack_mm(x, int8 (N, K), scales (N,))` = x @ (q * s).T, one scale per row. It
  misbehaves (wrong results or a crash) unless K % 16 == 0, so callers only pass blocks of 32k columns.

Because the packed int4 layout is version-specific, checkpoints never store it: weights are repacked at
load time. `unpack_int4` reads the layout back (for the bf16 dequantized path and for export); it is
verified against the running torch by `int4_layout_ok()` and simply not used if the layout ever changes.
"""

from __future__ import annotations

import functools

import torch

INT4_KERNEL_GROUPS = (256, 128, 64, 32)
N_BLOCK = 64          # rows per block of the packed int4 layout (and our N padding)
PACK_ROWS = 4096      # pack this many rows at a time (bounds the int32 temporary on huge lm_heads)


def _has(name: str) -> bool:
    return hasattr(torch.ops.aten, name)


@functools.cache
def int4_available() -> bool:
    """True if this torch has the CPU int4 kernels and they run and agree with a reference."""
    if not (_has("_convert_weight_to_int4pack_for_cpu") and _has("_weight_int4pack_mm_for_cpu")):
        return False
    try:
        g = torch.Generator().manual_seed(0)
        q = torch.randint(0, 16, (64, 64), dtype=torch.int32, generator=g)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 8)
        sz = torch.stack([torch.full((2, 64), 0.5), torch.full((2, 64), 0.25)], -1).to(torch.bfloat16)
        x = torch.randn(2, 64, generator=g).to(torch.bfloat16)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 32, sz)
        ref = x.float() @ ((q.float() - 8) * 0.5 + 0.25).T
        return bool(torch.allclose(y.float(), ref, rtol=2e-2, atol=2e-1))
    except (RuntimeError, NotImplementedError):
        return False


@functools.cache
def int8_available() -> bool:
    if not _has("_weight_int8pack_mm"):
        return False
    try:
        g = torch.Generator().manual_seed(0)
        w = torch.randint(-128, 128, (48, 64), dtype=torch.int8, generator=g)
        s = torch.rand(48, generator=g).to(torch.bfloat16)
        x = torch.randn(3, 64, generator=g).to(torch.bfloat16)
        y = torch.ops.aten._weight_int8pack_mm(x, w, s)
        ref = x.float() @ (w.float() * s.float()[:, None]).T
        return bool(torch.allclose(y.float(), ref, rtol=2e-2, atol=5e-1))
    except (RuntimeError, NotImplementedError):
        return False


def kernel_group(group_size: int, in_features: int) -> int | None:
    """The int4 kernel group to run a weight with: a supported size whose blocks never straddle two of the
    weight's groups (a divisor of group_size; any size for per-channel weights), picking the one that needs
    the least K padding (then the largest). None if no supported size fits."""
    fits = [g for g in INT4_KERNEL_GROUPS if group_size == -1 or group_size % g == 0]
    if not fits:
        return None
    return min(fits, key=lambda g: (-(-in_features // g) * g, -g))


def pad_to(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Codes (Np, Kp) with Np % 64 == 0 -> torch's packed int4 layout (packed per 64-row block, so big
    weights are converted a few thousand rows at a time)."""
    parts = [torch.ops.aten._convert_weight_to_int4pack_for_cpu(q[r:r + PACK_ROWS].to(torch.int32).contiguous(), 8)
             for r in range(0, q.shape[0], PACK_ROWS)]
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def unpack_int4(packed: torch.Tensor, k: int) -> torch.Tensor:
    """Rows of torch's packed int4 layout (a whole number of 64-row blocks) -> uint8 codes (rows, k).

    Layout (torch 2.5+ CPU, checked by `int4_layout_ok`): each block of 64 output rows is stored as
    K x 32 bytes; byte (k, i) holds row i in its low nibble and row i + 32 in its high nibble.
    """
    rows = packed.shape[0]
    b = packed.reshape(rows // N_BLOCK, k, N_BLOCK // 2)            # (blocks, K, 32)
    q = torch.stack([b & 0xF, b >> 4], dim=1)                       # (blocks, 2, K, 32)
    return q.permute(0, 1, 3, 2).reshape(rows, k)


@functools.cache
def int4_layout_ok() -> bool:
    """True if `unpack_int4` inverts this torch's `_convert_weight_to_int4pack_for_cpu`."""
    if not int4_available():
        return False
    g = torch.Generator().manual_seed(1)
    q = torch.randint(0, 16, (128, 96), dtype=torch.uint8, generator=g)
    try:
        return torch.equal(unpack_int4(pack_int4(q), 96), q)
    except RuntimeError:
        return False


def int4_mm(x: torch.Tensor, packed: torch.Tensor, kernel_group: int, scale_zeros: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, kernel_group, scale_zeros)


def int8_mm(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten._weight_int8pack_mm(x, q, scales)


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """Our own, version-independent 4-bit layout: (N, K) codes -> uint8 (N, ceil(K/2)); column 2j in the low
    nibble, 2j+1 in the high nibble (an odd K is padded with a zero code)."""
    if q.shape[1] % 2:
        q = torch.cat([q, q.new_zeros(q.shape[0], 1)], dim=1)
    q = q.to(torch.uint8)
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()


def unpack_nibbles(packed: torch.Tensor, k: int) -> torch.Tensor:
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(packed.shape[0], -1)[:, :k]
