"""`QLinearPerGrp`: a linear layer that keeps its weight per-group quantized and computes with it.

Backends, picked when the weight is set:
- "int4" (w_bit <= 4): torch's packed int4 CPU kernel (`kernels.int4_mm`) for short inputs (decode).
- "int8" (w_bit 5..8): `_weight_int8pack_mm` once per group (one scale per row and group), plus a rank-ng
  correction for the zero points: x @ ((q - z) * s).T = sum_g (x_g @ (q_g - 128).T) * s_g
  + sum_g (sum(x_g) * (128 - z_g) * s_g).
- "dense": no kernel available (or an unsupported group size): codes kept in our own layout.
Every backend also has the bf16 dequantized path: for inputs of `DENSE_FROM_ROWS` rows or more (prefill,
perplexity; 128 for int4, 32 for int8) the weight is dequantized to the input dtype a few thousand rows at a
time and multiplied densely, which is faster than the low-bit kernels at that size. For int4 weights and bf16
inputs that dequantization is one pass of our C kernel (`edgellm.native`, ~4x faster than eager torch; dense from 48
rows then), when it could be built; otherwise eager torch. Both give the same values.

Inputs whose width is not a multiple of the kernel group are zero-padded at run time (the padded weight
columns are never seen by real inputs). The exact float16 scales and integer zeros are always kept, so
`to_quantized()` gives back bit-identical parameters for export.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import native
from ..kernels import torch_lowbit as kernels
from .pergroup import QuantizedWeight

_CODE_OFFSET = 128  # int8 backend stores q - 128 so any 8-bit unsigned code fits a signed int8


class QLinearPerGrp(nn.Module):
    # Rows from which the dequantized dense path beats the packed kernel (measured, AVX512-BF16 CPU, bf16);
    # with the C dequantizer int4 crosses over at ~40 rows (a 64-token prefill: 44 vs 55 ms).
    DENSE_FROM_ROWS = {"int4": 128, "int8": 32}
    NATIVE_INT4_DENSE_FROM_ROWS = 48
    dequant_min_tokens: int | None = None   # one threshold for every backend instead (tests force kernels)
    dense_chunk_elems: int = 1 << 22   # weight elements dequantized at once on that path

    def __init__(self, in_features: int, out_features: int, w_bit: int, group_size: int, sym: bool = False,
                 bias: bool = False, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.w_bit, self.group_size, self.sym = w_bit, group_size, sym
        self.backend = "unset"
        self.register_buffer("input_scale", None, persistent=False)
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype),
                                 requires_grad=False) if bias else None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: torch.Tensor | None = None,
                       dtype: torch.dtype = torch.bfloat16, backend: str = "auto") -> QLinearPerGrp:
        m = cls(qw.in_features, qw.out_features, qw.bits, qw.group_size, qw.sym, bias is not None, dtype=dtype)
        if bias is not None:
            m.bias.data = bias.detach().to(dtype).clone()
        m.set_weight(qw, backend=backend, dtype=dtype)
        return m

    def _buf(self, name: str, t: torch.Tensor) -> None:
        # Not persistent: the packed layouts are runtime-private; checkpoints go through to_quantized().
        self.register_buffer(name, t, persistent=False)

    def set_weight(self, qw: QuantizedWeight, backend: str = "auto", dtype: torch.dtype = torch.bfloat16) -> None:
        if (qw.in_features, qw.out_features) != (self.in_features, self.out_features):
            raise ValueError(f"weight is {qw.out_features}x{qw.in_features}, layer is "
                             f"{self.out_features}x{self.in_features}")
        self.w_bit, self.group_size, self.sym = qw.bits, qw.group_size, qw.sym
        # float16 scales kept bit-exact as int16: Module.to(dtype) converts float buffers, not integer ones.
        self._buf("scales16", qw.scales.to(torch.float16).contiguous().view(torch.int16))
        self._buf("zeros", qw.zeros.to(torch.uint8).contiguous())
        if backend == "auto":
            backend = self._pick_backend()
        getattr(self, f"_setup_{backend}")(qw, dtype)
        self.backend = backend

    def set_input_scale(self, scale: torch.Tensor | None) -> None:
        """Multiply inputs by this per-channel fp32 vector first (AWQ+'s lm_head; see convert.ScaledLinear)."""
        if scale is None:
            self.input_scale = None
        else:
            self._buf("input_scale", scale.detach().float().clone())

    def _pick_backend(self) -> str:
        if self.w_bit <= 4:
            ok = kernels.int4_available() and kernels.kernel_group(self.group_size, self.in_features) is not None
            return "int4" if ok else "dense"
        ok = kernels.int8_available() and (self.group_size == -1 or self.group_size % 32 == 0)
        return "int8" if ok else "dense"

    def _setup_int4(self, qw: QuantizedWeight, dtype: torch.dtype) -> None:
        n, k = self.out_features, self.in_features
        self.kgroup = kernels.kernel_group(self.group_size, k)
        if self.kgroup is None or self.w_bit > 4:
            raise ValueError(f"int4 kernel cannot run w_bit={self.w_bit} group_size={self.group_size}")
        self.k_pad, self.n_pad = kernels.pad_to(k, self.kgroup), kernels.pad_to(n, kernels.N_BLOCK)
        # Centre codes of fewer than 4 bits on the kernel's fixed 8 (3 bit: 0..7 -> 4..11): the float zero
        # (8 - z) * s stays small, so less of the result cancels out after bf16 rounding.
        self.code_shift = 8 - 2 ** (self.w_bit - 1)
        # Padded and packed PACK_ROWS rows at a time straight into the result: a 49k-row lm_head would
        # otherwise hold several full-size copies of its codes (shifted, padded, int32) at once.
        packed = torch.empty(self.n_pad, self.k_pad // 2, dtype=torch.uint8)
        for r in range(0, self.n_pad, kernels.PACK_ROWS):
            rows = min(kernels.PACK_ROWS, self.n_pad - r)
            c = qw.q[r:r + rows]
            c = F.pad(c + self.code_shift if self.code_shift else c, (0, self.k_pad - k, 0, rows - c.shape[0]))
            packed[r:r + rows] = kernels.pack_int4(c)
        self._buf("packed", packed)
        # Kernel block j starts at column j * kgroup; it lies inside weight group (j * kgroup) // group_size.
        starts = torch.arange(self.k_pad // self.kgroup) * self.kgroup
        idx = torch.zeros_like(starts) if self.group_size == -1 else (starts // self.group_size)
        idx = idx.clamp(max=qw.scales.shape[1] - 1)  # blocks wholly in the K padding reuse the last group
        s = qw.scales.float()[:, idx]
        zero = (8 - self.code_shift - qw.zeros.float()[:, idx]) * s  # kernel: (q' - 8) * s + zero == (q - z) * s
        sz = torch.stack([s, zero], dim=-1)            # (N, blocks, 2)
        sz = F.pad(sz, (0, 0, 0, 0, 0, self.n_pad - n))
        self._buf("scale_zeros", sz.transpose(0, 1).contiguous().to(dtype))
        if not kernels.int4_layout_ok():  # cannot read the packed layout back: keep our own copy of the codes
            self._buf("nibbles", kernels.pack_nibbles(qw.q))

    def _setup_int8(self, qw: QuantizedWeight, dtype: torch.dtype) -> None:
        n, k = self.out_features, self.in_features
        self.g8 = kernels.pad_to(k, 32) if self.group_size == -1 else self.group_size
        self.k_pad = kernels.pad_to(k, self.g8)
        ng = self.k_pad // self.g8
        codes = F.pad(qw.q.to(torch.int16) - _CODE_OFFSET, (0, self.k_pad - k))
        self._buf("q8", codes.to(torch.int8).reshape(n, ng, self.g8).transpose(0, 1).contiguous())  # (ng, N, G)
        s = qw.scales.float() if self.group_size != -1 else qw.scales.float().expand(n, ng)
        z = qw.zeros.float() if self.group_size != -1 else qw.zeros.float().expand(n, ng)
        self._buf("s8", s.t().contiguous().to(dtype))
        self.has_zero_term = bool((qw.zeros != _CODE_OFFSET).any())
        self._buf("zterm", ((_CODE_OFFSET - z) * s).t().contiguous().float())

    def _setup_dense(self, qw: QuantizedWeight, dtype: torch.dtype) -> None:
        self.k_pad = self.in_features
        if self.w_bit <= 4:
            self._buf("nibbles", kernels.pack_nibbles(qw.q))
        else:
            self._buf("codes", qw.q.to(torch.uint8).contiguous())

    # ------------------------------------------------------------------ reading the weight back
    @property
    def scales(self) -> torch.Tensor:
        return self.scales16.view(torch.float16)

    def _codes(self, r0: int, r1: int) -> torch.Tensor:
        """Integer codes of output rows r0:r1 (r0 a multiple of 64), as uint8 (rows, K)."""
        k = self.in_features
        if hasattr(self, "nibbles"):
            return kernels.unpack_nibbles(self.nibbles[r0:r1], k)
        if self.backend == "int4":
            r1p = min(kernels.pad_to(r1, kernels.N_BLOCK), self.n_pad)
            q = kernels.unpack_int4(self.packed[r0:r1p], self.k_pad)[:r1 - r0, :k]
            return q - self.code_shift if self.code_shift else q
        if self.backend == "int8":
            q = self.q8[:, r0:r1].transpose(0, 1).reshape(r1 - r0, -1)[:, :k]
            return (q.to(torch.int16) + _CODE_OFFSET).to(torch.uint8)
        return self.codes[r0:r1]

    def dequantized_rows(self, r0: int, r1: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(q - z) * s for output rows r0:r1, computed in fp32 (one rounding to `dtype` at the end)."""
        q = self._codes(r0, r1)
        n, k = q.shape
        ng = self.zeros.shape[1]
        g = k if self.group_size == -1 else self.group_size
        if ng * g != k:  # a short last group: pad it to a whole group, cut the columns off afterwards
            q = F.pad(q, (0, ng * g - k))
        s = self.scales[r0:r1].float().unsqueeze(-1)                   # (n, ng, 1)
        z = self.zeros[r0:r1].float().unsqueeze(-1)
        w = q.view(n, ng, g).float().sub_(z).mul_(s)                    # exactly QuantizedWeight.dequantize()
        return w.view(n, ng * g)[:, :k].to(dtype)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.dequantized_rows(0, self.out_features, dtype)

    def effective_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight this layer multiplies by (input scale folded in): what other tools get."""
        w = self.dequantized_weight(torch.float32)
        return (w if self.input_scale is None else w * self.input_scale[None, :]).to(dtype)

    def to_quantized(self) -> QuantizedWeight:
        return QuantizedWeight(self._codes(0, self.out_features).contiguous(), self.scales.clone(),
                               self.zeros.clone(), self.w_bit, self.group_size, self.sym)

    # ------------------------------------------------------------------ compute
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend == "unset":
            raise RuntimeError("QLinearPerGrp has no weight yet (call set_weight)")
        if self.input_scale is not None:
            x = x * self.input_scale.to(x.dtype)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        rows = x2.shape[0]
        # fp32 inputs (reference evaluation) always take the exact dense path.
        kernel = rows < self._dense_from_rows(x2) and x.dtype in (torch.bfloat16, torch.float16)
        if kernel and self.backend == "int4":
            y = self._forward_int4(x2)
        elif kernel and self.backend == "int8":
            y = self._forward_int8(x2)
        else:
            y = self._forward_dense(x2)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*lead, self.out_features)

    def _dense_from_rows(self, x2: torch.Tensor) -> int:
        if self.dequant_min_tokens is not None:
            return self.dequant_min_tokens
        # (one-token decode never asks for the C dequantizer: the compiled step traces this method)
        if x2.shape[0] >= self.NATIVE_INT4_DENSE_FROM_ROWS and self._native_dequantizer(x2) is not None:
            return self.NATIVE_INT4_DENSE_FROM_ROWS
        return self.DENSE_FROM_ROWS.get(self.backend, 0)

    def _forward_int4(self, x2: torch.Tensor) -> torch.Tensor:
        if self.k_pad != self.in_features:
            x2 = F.pad(x2, (0, self.k_pad - self.in_features))
        sz = self.scale_zeros if self.scale_zeros.dtype == x2.dtype else self.scale_zeros.to(x2.dtype)
        y = kernels.int4_mm(x2.contiguous(), self.packed, self.kgroup, sz)
        return y[:, :self.out_features].contiguous() if self.n_pad != self.out_features else y

    def _forward_int8(self, x2: torch.Tensor) -> torch.Tensor:
        if self.k_pad != self.in_features:
            x2 = F.pad(x2, (0, self.k_pad - self.in_features))
        ng = self.q8.shape[0]
        s8 = self.s8 if self.s8.dtype == x2.dtype else self.s8.to(x2.dtype)
        if ng == 1:
            y = kernels.int8_mm(x2.contiguous(), self.q8[0], s8[0]).float()
        else:
            xg = x2.reshape(x2.shape[0], ng, self.g8)
            y = torch.zeros(x2.shape[0], self.out_features, dtype=torch.float32)
            for g in range(ng):  # fp32 accumulation of the per-group partial products
                y += kernels.int8_mm(xg[:, g].contiguous(), self.q8[g], s8[g]).float()
        if self.has_zero_term:
            y += x2.reshape(x2.shape[0], ng, self.g8).float().sum(-1) @ self.zterm
        return y.to(x2.dtype)

    def _forward_dense(self, x2: torch.Tensor) -> torch.Tensor:
        n = self.out_features
        step = max(kernels.N_BLOCK, self.dense_chunk_elems // max(self.in_features, 1)
                   // kernels.N_BLOCK * kernels.N_BLOCK)
        dequant_t = self._native_dequantizer(x2)
        if dequant_t is not None:  # one C pass straight from the packed layout to W^T (same values)
            group = self.in_features if self.group_size == -1 else self.group_size
            outs = [x2 @ dequant_t(self.packed, self.scales16, self.zeros, self.in_features, self.k_pad, r,
                                   min(n, r + step), group, self.code_shift) for r in range(0, n, step)]
        else:
            outs = [F.linear(x2, self.dequantized_rows(r, min(n, r + step), x2.dtype)) for r in range(0, n, step)]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)

    def _native_dequantizer(self, x2: torch.Tensor) -> native.Dequantizer | None:
        if self.backend != "int4" or x2.dtype != torch.bfloat16:
            return None
        return native.int4_dequantizer()  # (None where the packed layout is unknown: the layer keeps nibbles)

    def extra_repr(self) -> str:
        # The seeds' model dump: QLinearPerGrp(in_features:576, out_features:576, bias:None, w_bit:4 group_size:128)
        bias = "None" if self.bias is None else "True"
        return (f"in_features:{self.in_features}, out_features:{self.out_features}, bias:{bias}, "
                f"w_bit:{self.w_bit} group_size:{self.group_size}")
