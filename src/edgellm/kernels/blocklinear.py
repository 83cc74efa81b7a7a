"""Layers that keep block-quantized weights (GGUF Q4_0/Q4_1/Q8_0, or our own int4 codes) and compute with them.

`BlockQLinear`: short inputs (decode; on AVX512-VNNI CPUs also prefill, see `dense_from_rows`) go through
`edgellm::qmatmul`, the C kernel with int8 activations (kernels/blockq.py); longer ones (prefill, perplexity)
dequantize a few thousand rows at a time to the input's dtype and run torch's dense GEMM, so prefill sees the
exact weight and never holds a float copy of the whole model. `BlockQEmbedding` looks rows up in the same
blocks (a tied embedding and lm_head share one copy).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import blockq, cpu


@dataclass
class BlockWeight:
    """A weight in the kernels/blockq.py layout: 4-bit (qs, dm = d and m per block) or 8-bit (qs, dm = d)."""
    bits: int
    qs: torch.Tensor
    dm: torch.Tensor
    out_features: int
    in_features: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return blockq.dequantize_rows(self.bits, self.qs, self.dm, self.in_features, 0, self.out_features, dtype)


def dense_from_rows(isa: int) -> int:
    """Input rows from which dequantizing + torch's dense GEMM beats the int8 kernel `isa` (docs/PERFORMANCE.md,
    sessions 13 and 16): AVX512-VNNI (16-row layout) 96 where oneDNN has AMX tiles for the GEMM, never without
    them (the kernel does ~500 int8 GOP/s on 2 cores against ~180-370 GFLOP/s of AVX-512 bf16 GEMM); AVX2 and
    AVX-VNNI never either: their multi-row products (~230 int8 GOP/s on 2 Zen 5 cores) beat the fp32 GEMM those
    CPUs have (~170 GFLOP/s there, its AVX2 peak) at every row count measured, 32 to 512 (0.55 / 0.68 / 0.74x the
    dense time). The dense path stays for training (forward_exact) and for CPUs without the kernel."""
    if isa == 2:
        return 96 if cpu.has("amx") else 1 << 62
    return 1 << 62


class BlockQLinear(nn.Module):
    DENSE_FROM_ROWS = 32      # decode and verify steps stay below this many rows (entries) on every kernel
    dense_chunk_elems = 1 << 22  # weight elements dequantized at once on that path

    def __init__(self, weight: BlockWeight, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.bits, self.in_features, self.out_features = weight.bits, weight.in_features, weight.out_features
        self.register_buffer("qs", weight.qs, persistent=False)
        self.register_buffer("dm", weight.dm, persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        # The kernel variant for the weight's layout, fixed at load (a plain int: the compiled step's fingerprint
        # includes it); -1: no usable C kernel here, torch computes the same product from the dequantized weight.
        self.isa = blockq.kernel_isa(blockq.lanes_of(weight.dm))
        self.dense_from_rows = dense_from_rows(self.isa)
        blockq.register_ops()  # now, not first inside a torch.compile trace (dynamo cannot trace the build)

    @property
    def weight_blocks(self) -> BlockWeight:
        return BlockWeight(self.bits, self.qs, self.dm, self.out_features, self.in_features)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.weight_blocks.dequantize(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if rows < self.dense_from_rows and self.isa >= 0 and x.dtype in (torch.float32, torch.bfloat16) and \
                not (x.requires_grad and torch.is_grad_enabled()):  # autograd: the dense product's backward
            y = blockq.qmatmul(x.contiguous(), self.qs, self.dm, self.bits, self.out_features, self.isa)
        else:
            y = self._forward_dense(x)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def forward_exact(self, x: torch.Tensor) -> torch.Tensor:
        """x @ W^T (+ bias) with the exact weight (no int8 activations), whatever the row count: training."""
        y = self._forward_dense(x)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def _forward_dense(self, x: torch.Tensor) -> torch.Tensor:
        n, k = self.out_features, self.in_features
        lanes = blockq.lanes_of(self.dm)
        step = max(lanes, self.dense_chunk_elems // k // lanes * lanes)
        # autograd would keep the weight for backward: then each chunk needs a tensor of its own
        buf = None if torch.is_grad_enabled() and x.requires_grad else _scratch(min(n, step) * k, x.dtype)
        outs = []
        for r in range(0, n, step):
            rows = min(n, r + step) - r
            w = blockq.dequantize_rows(self.bits, self.qs, self.dm, k, r, r + rows, x.dtype,
                                       out=None if buf is None else buf[:rows * k].view(rows, k))
            outs.append(F.linear(x, w))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)

    def extra_repr(self) -> str:
        kind = "Q4 (d, m per 32)" if self.bits == 4 else "Q8 (d per 32)"
        return f"in_features:{self.in_features}, out_features:{self.out_features}, {kind}, isa:{self.isa}"


_local = threading.local()


def _scratch(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A per-thread buffer for dequantized weight chunks, reused by every layer: a fresh multi-MB tensor per
    product would cost page faults on every prefill (the GEMM reads the chunk right after it is written, so one
    buffer per thread is enough; threads never share one)."""
    bufs = _local.__dict__.setdefault("bufs", {})
    buf = bufs.get(dtype)
    if buf is None or buf.numel() < numel:
        buf = bufs[dtype] = torch.empty(numel, dtype=dtype)
    return buf


class BlockQEmbedding(nn.Module):
    """Token embedding read from block-quantized rows (exact dequantized values, in `dtype`)."""

    def __init__(self, weight: BlockWeight, dtype: torch.dtype) -> None:
        super().__init__()
        self.bits, self.num_embeddings, self.embedding_dim = weight.bits, weight.out_features, weight.in_features
        self.register_buffer("qs", weight.qs, persistent=False)
        self.register_buffer("dm", weight.dm, persistent=False)
        self.dtype = dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        lanes = blockq.lanes_of(self.dm)
        g, r = ids // lanes, ids % lanes                              # row n lives in group n // L, lane n % L
        if self.qs.dim() == 5:                                        # 16-row groups: (G, nb, B/4, 16, 4)
            b = self.qs[g, :, :, r].flatten(-2)                       # (..., nb, B) in GGML's order
        else:
            b = self.qs[g, :, r]                                      # (..., nb, B)
        if self.bits == 4:
            q = torch.stack([b & 0x0F, b >> 4], dim=-2).float()       # (..., nb, 2, 16)
            f = self.dm[g, :, :, r].float()                           # (..., nb, 2)
            w = q * f[..., 0, None, None] + f[..., 1, None, None]
        else:
            w = b.float() * self.dm[g, :, r].float()[..., None]       # (..., nb, 32)
        return w.reshape(*ids.shape, self.embedding_dim).to(self.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, Q{self.bits} blocks"
