"""Per-group round-to-nearest quantization: the integer convention every other quant module uses.

Convention (AutoAWQ's, so checkpoints need no conversion of values): each weight row (one output
channel) is cut into groups of `group_size` consecutive input columns. A group has a scale `s`, stored in
float16 as AutoAWQ does, and an integer zero point `z`; its codes are unsigned, `q in [0, 2**bits - 1]`,
and stand for the weight `(q - z) * s`.

- asymmetric: `s = (max - min) / (2**bits - 1)`, `z = round(-min / s)`, `q = clamp(round(w / s) + z)`, with
  min <= 0 <= max so that z is always a valid code.
- symmetric:  `s = absmax / (2**(bits-1) - 1)`, `z = 2**(bits-1)` for every group, so codes are the signed
  values shifted into the unsigned range (4 bit: -7..7 -> 1..15). Storing it this way lets symmetric
  weights travel in the same zero-point layout.

`group_size == -1` means one group per row (per output channel). When `in_features` is not a multiple of
`group_size`, the last group is simply shorter; its statistics come from its real columns only.
The scale is rounded to float16 *before* the codes are computed, so `dequantize()` reproduces exactly
what a checkpoint stores.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import InvalidArgumentError

SCALE_MIN = 1e-5  # AutoAWQ's clamp: an all-equal group must not divide by zero


def n_groups(in_features: int, group_size: int) -> int:
    return 1 if group_size == -1 else -(-in_features // group_size)


def grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """(N, K) -> (N, n_groups, G), padding a short last group by repeating its last column.

    Repeating a real value keeps the group's min, max and absmax unchanged, so padding never moves a scale.
    """
    n, k = w.shape
    g = k if group_size == -1 else group_size
    pad = (-k) % g
    if pad:
        w = torch.cat([w, w[:, -1:].expand(n, pad)], dim=1)
    return w.reshape(n, -1, g)


def expand_groups(t: torch.Tensor, group_size: int, in_features: int) -> torch.Tensor:
    """Per-group values (N, n_groups) -> per-column values (N, K)."""
    g = in_features if group_size == -1 else group_size
    return t.repeat_interleave(g, dim=1)[:, :in_features]


@dataclass
class QuantizedWeight:
    """Integer codes and group parameters of one (N, K) weight; `group_size` is -1 for per-channel."""

    q: torch.Tensor        # uint8 (N, K), codes in [0, 2**bits - 1]
    scales: torch.Tensor   # float16 (N, n_groups)
    zeros: torch.Tensor    # uint8 (N, n_groups)
    bits: int
    group_size: int
    sym: bool = False

    @property
    def out_features(self) -> int:
        return self.q.shape[0]

    @property
    def in_features(self) -> int:
        return self.q.shape[1]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        k = self.in_features
        s = expand_groups(self.scales.float(), self.group_size, k)
        z = expand_groups(self.zeros.float(), self.group_size, k)
        return ((self.q.float() - z) * s).to(dtype)

    def split_rows(self, sizes: list[int]) -> list[QuantizedWeight]:
        """Split along output channels (fused qkv -> q, k, v); group parameters split with their rows."""
        return [QuantizedWeight(q, s, z, self.bits, self.group_size, self.sym)
                for q, s, z in zip(self.q.split(sizes), self.scales.split(sizes), self.zeros.split(sizes),
                                   strict=True)]

    @staticmethod
    def cat_rows(parts: list[QuantizedWeight]) -> QuantizedWeight:
        first = parts[0]
        for p in parts[1:]:
            if (p.bits, p.group_size, p.in_features) != (first.bits, first.group_size, first.in_features):
                raise InvalidArgumentError("cannot fuse quantized weights with different bits/group/in_features")
        return QuantizedWeight(torch.cat([p.q for p in parts]), torch.cat([p.scales for p in parts]),
                               torch.cat([p.zeros for p in parts]), first.bits, first.group_size,
                               all(p.sym for p in parts))

    def regroup(self, group_size: int) -> QuantizedWeight:
        """The same weight expressed with a smaller group size that divides the current one (or any size for
        per-channel weights): each group's scale/zero is repeated. Exact: every code keeps its value."""
        k = self.in_features
        if group_size == self.group_size:
            return self
        if self.group_size != -1 and self.group_size % group_size:
            raise InvalidArgumentError(f"group size {group_size} does not divide {self.group_size}")
        n_new = n_groups(k, group_size)
        # Column where each new group starts -> the old group holding that column.
        starts = torch.arange(n_new) * group_size
        old = torch.zeros_like(starts) if self.group_size == -1 else starts // self.group_size
        return QuantizedWeight(self.q, self.scales[:, old].contiguous(), self.zeros[:, old].contiguous(),
                               self.bits, group_size, self.sym)

    def coarsen(self, group_size: int) -> QuantizedWeight | None:
        """Inverse of `regroup`: merge groups into `group_size` groups if their scales/zeros are equal;
        None when they are not (then the finer grouping is the truth)."""
        if group_size == self.group_size:
            return self
        k = self.in_features
        n_new = n_groups(k, group_size)
        starts = torch.arange(n_new) * (k if group_size == -1 else group_size)
        merged = QuantizedWeight(self.q, self.scales[:, starts // self.group_size].contiguous(),
                                 self.zeros[:, starts // self.group_size].contiguous(), self.bits, group_size,
                                 self.sym)
        back = merged.regroup(self.group_size)
        if torch.equal(back.scales, self.scales) and torch.equal(back.zeros, self.zeros):
            return merged
        return None


def check_bits(bits: int) -> None:
    if not 2 <= bits <= 8:
        raise InvalidArgumentError(f"w_bit must be between 2 and 8 (got {bits})")


def _qparams(wg: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Scales (float16-rounded, as fp32), zero points and the code range for groups along the last dim."""
    if sym:
        scales = (wg.abs().amax(-1) / (2 ** (bits - 1) - 1)).clamp(min=SCALE_MIN).half().float()
        zeros = torch.full_like(scales, 2 ** (bits - 1))
        return scales, zeros, 1, 2 ** bits - 1  # -qmax..qmax shifted by the zero point: code 0 is unused
    # The range always includes 0 (as GPTQ does; AutoAWQ does not): otherwise a group of one sign needs a
    # zero point outside the code range and its far end is clipped.
    hi_val, lo_val = wg.amax(-1).clamp(min=0), wg.amin(-1).clamp(max=0)
    scales = ((hi_val - lo_val).clamp(min=SCALE_MIN) / (2 ** bits - 1)).half().float()
    zeros = (-torch.round(lo_val / scales)).clamp(0, 2 ** bits - 1)
    return scales, zeros, 0, 2 ** bits - 1


QUANTIZE_ROWS = 4096  # rows rounded at a time: bounds the fp32 scratch (a 49k-row lm_head would need ~0.5 GB)


def quantize(w: torch.Tensor, bits: int, group_size: int, sym: bool = False) -> QuantizedWeight:
    """Round-to-nearest per-group quantization of an (N, K) weight (any float dtype; computed in fp32)."""
    check_bits(bits)
    if group_size != -1 and group_size < 1:
        raise InvalidArgumentError(f"group_size must be -1 or >= 1 (got {group_size})")
    n, k = w.shape
    parts = []
    for r in range(0, n, QUANTIZE_ROWS):  # rows are independent: the same codes as one pass
        wg = grouped(w[r:r + QUANTIZE_ROWS].detach().float(), group_size)   # (rows, ng, G)
        scales, zeros, lo, hi = _qparams(wg, bits, sym)
        q = (torch.round(wg / scales[..., None]) + zeros[..., None]).clamp(lo, hi)
        parts.append((q.reshape(wg.shape[0], -1)[:, :k].to(torch.uint8), scales.half(), zeros.to(torch.uint8)))
    q, scales, zeros = (torch.cat(t) if len(parts) > 1 else t[0].contiguous() for t in zip(*parts, strict=True))
    return QuantizedWeight(q.contiguous(), scales, zeros, bits, group_size, sym)


def fake_quantize_groups(wg: torch.Tensor, bits: int, sym: bool = False) -> torch.Tensor:
    """quantize -> dequantize of fp32 groups laid along the last dim (the AWQ searches' inner loop).

    Same values as `quantize(...).dequantize()`, in four passes: (round(w/s) + z).clamp(0, qmax) - z equals
    round(w/s).clamp(-z, qmax - z) because everything is an integer."""
    qmax = 2 ** bits - 1
    if sym:
        s = (wg.abs().amax(-1, keepdim=True) / (2 ** (bits - 1) - 1)).clamp_(min=SCALE_MIN).half().float()
        lim = 2 ** (bits - 1) - 1
        return torch.div(wg, s).round_().clamp_(-lim, lim).mul_(s)
    lo, hi = torch.aminmax(wg, dim=-1, keepdim=True)
    lo, hi = lo.clamp_(max=0), hi.clamp_(min=0)
    s = ((hi - lo).clamp_(min=SCALE_MIN) / qmax).half().float()
    z = torch.div(lo, s).round_().neg_().clamp_(0, qmax)
    return torch.div(wg, s).round_().clamp_(min=-z, max=qmax - z).mul_(s)


def fake_quantize(w: torch.Tensor, bits: int, group_size: int, sym: bool = False) -> torch.Tensor:
    """quantize -> dequantize, in w's dtype (the "fake quantization" used for evaluation and AWQ search)."""
    n, k = w.shape
    return fake_quantize_groups(grouped(w.detach().float(), group_size), bits, sym).reshape(n, -1)[:, :k].to(w.dtype)
