"""Weights in blocks of 32 (4-bit Q4: w = d * q + m; 8-bit Q8: w = d * q), and the `edgellm::qmatmul` op.

The layouts (documented in csrc/qmatmul.c) group rows by 4 (AVX2, AVX-VNNI) or by 16 (AVX512-VNNI: one row per
zmm lane); a weight is packed once at load for the kernel this CPU runs (`load_lanes`). `pack_q4` /
`pack_q8` build them from per-row blocks (GGUF's Q4_0/Q4_1/Q8_0 bytes map onto them exactly, and so does an
integer zero point with fp16 scales, up to rounding m = -z * d to fp16). `qmatmul` multiplies with the C kernel
(activations quantized to int8 per block of 32, integer dot products: AVX2, AVX-VNNI or AVX512-VNNI, chosen by
kernels.cpu); `dequantize_rows` gives the exact float weight for the dense (prefill) path. Without a C compiler
or AVX2 both fall back to torch code with the same results as the dequantized weight.

`qmatmul` is a torch custom op (`torch.ops.edgellm.qmatmul`) so the compiled decode step calls it as one
opaque kernel while inductor fuses everything around it. `register_ops()` defines it (once per process).
"""

from __future__ import annotations

import ctypes
import functools

import torch

from . import cpu, native

QK = 32   # values per block
R = 4     # rows per group in the AVX2 / AVX-VNNI layout (isa 0, 1)
R16 = 16  # rows per group in the AVX512-VNNI layout (isa 2)


def lanes_for(isa: int | None) -> int:
    """Rows per group of the layout the isa's kernels read."""
    return R16 if isa == 2 else R


def lanes_of(dm: torch.Tensor) -> int:
    """Rows per group of a packed weight (its scales' last dimension)."""
    return dm.shape[-1]


def load_lanes() -> int:
    """The layout to pack for at load: the one this CPU's kernel reads (where the C kernels work), else 4."""
    isa = cpu.int8_dot_isa()
    return lanes_for(isa) if isa is not None and available() else R


def kernel_isa(lanes: int) -> int:
    """The fastest kernel variant this CPU runs on weights packed with `lanes` rows per group; -1: none (torch)."""
    isas = [i for i in runnable_isas() if lanes_for(i) == lanes] if available() else []
    return isas[-1] if isas else -1


def pad_rows(n: int, lanes: int = R) -> int:
    return -(-n // lanes) * lanes


def _interleave(t: torch.Tensor, lanes: int) -> torch.Tensor:
    """(N, nb, ...) per-row blocks -> (N/L, nb, L, ...) (N padded to L with zero rows)."""
    n = t.shape[0]
    if n % lanes:
        t = torch.cat([t, t.new_zeros(pad_rows(n, lanes) - n, *t.shape[1:])])
    return t.reshape(-1, lanes, *t.shape[1:]).transpose(1, 2).contiguous()


def _pack_bytes(b: torch.Tensor, lanes: int) -> torch.Tensor:
    """Per-row block bytes (N, nb, B) -> R: (N/4, nb, 4, B); R16: (N/16, nb, B/4, 16, 4), each row's 4-byte chunks
    side by side so that one zmm lane holds one row (see csrc/qmatmul.c)."""
    if lanes == R:
        return _interleave(b, R)
    t = _interleave(b, R16)                                                  # (N/16, nb, 16, B)
    return t.reshape(*t.shape[:3], -1, 4).transpose(2, 3).contiguous()       # (N/16, nb, B/4, 16, 4)


def _row_bytes(qs: torch.Tensor, g0: int, g1: int) -> torch.Tensor:
    """Groups g0:g1 of a packed qs back to per-row block bytes (rows, nb, B) in GGML's order."""
    q = qs[g0:g1]
    if q.dim() == 5:                                                        # (g, nb, B/4, 16, 4)
        q = q.transpose(2, 3).reshape(*q.shape[:2], R16, -1)                 # (g, nb, 16, B)
    return q.transpose(1, 2).reshape(-1, q.shape[1], q.shape[3])


def pack_q4(nibbles: torch.Tensor, d: torch.Tensor, m: torch.Tensor, lanes: int = R
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """nibbles uint8 (N, nb, 16) in GGML order (byte j: element j low, j + 16 high), d and m (N, nb) (rounded
    to fp16) -> (qs uint8 (N/4, nb, 4, 16) or (N/16, nb, 4, 16, 4), dm fp16 (N/L, nb, 2, L))."""
    dm = torch.stack([d.to(torch.float16), m.to(torch.float16)], dim=-1)  # (N, nb, 2)
    return _pack_bytes(nibbles.to(torch.uint8), lanes), _interleave(dm, lanes).transpose(2, 3).contiguous()


def pack_q8(codes: torch.Tensor, d: torch.Tensor, lanes: int = R) -> tuple[torch.Tensor, torch.Tensor]:
    """codes int8 (N, nb, 32), d (N, nb) -> (qs int8 (N/4, nb, 4, 32) or (N/16, nb, 8, 16, 4), d fp16 (N/L, nb, L))."""
    return _pack_bytes(codes.to(torch.int8), lanes), _interleave(d.to(torch.float16), lanes)


def ggml_nibbles(q: torch.Tensor) -> torch.Tensor:
    """Codes (N, K) in 0..15, K % 32 == 0 -> (N, K/32, 16) bytes in GGML's order."""
    b = q.to(torch.uint8).reshape(q.shape[0], -1, 2, 16)
    return b[:, :, 0] | (b[:, :, 1] << 4)


def dequantize_rows_torch(bits: int, qs: torch.Tensor, dm: torch.Tensor, n0: int, n1: int,
                          dtype: torch.dtype) -> torch.Tensor:
    """Rows n0:n1 (n0 a multiple of the group size) of the weight, (n1 - n0, K), computed in fp32 and rounded once
    to dtype."""
    lanes = lanes_of(dm)
    g0, g1 = n0 // lanes, -(-n1 // lanes)
    b = _row_bytes(qs, g0, g1)                                               # (rows, nb, 16 or 32)
    if bits == 4:
        q = torch.stack([b & 0x0F, b >> 4], dim=2).float()                   # (rows, nb, 2, 16)
        f = dm[g0:g1].permute(0, 3, 1, 2).reshape(-1, b.shape[1], 2).float()  # (rows, nb, 2)
        w = q * f[:, :, 0, None, None] + f[:, :, 1, None, None]
    else:
        w = b.float() * dm[g0:g1].transpose(1, 2).reshape(-1, b.shape[1]).float()[..., None]  # (rows, nb, 32)
    w = w.reshape(w.shape[0], -1)
    return w[n0 - g0 * lanes:n1 - g0 * lanes].to(dtype)


@functools.cache
def _c_kernels() -> tuple | None:
    """(qmatmul, qdequant) from csrc/qmatmul.c, checked against the torch reference; None (reason in
    native.reasons["qmatmul"]) where there is no compiler or no AVX2."""
    name = "qmatmul"
    if cpu.int8_dot_isa() is None:
        native.reasons[name] = "this CPU has no AVX2"
        return None
    loaded = native.load_torch_op(name)
    if loaded is None:
        return None
    lib, has_op = loaded
    try:
        mm, dq = lib.edgellm_qmatmul, lib.edgellm_qdequant
    except AttributeError as e:
        native.reasons[name] = f"building {name} failed: {e}"
        return None
    global _OP_IN_CPP
    _OP_IN_CPP = has_op
    mm.restype = ctypes.c_int
    mm.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                   ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int]
    dq.restype = None
    dq.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                   ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int]
    pair = (mm, dq)
    return pair if native._verified(name, pair, _self_check) is not None else None


def _self_check(pair: tuple) -> bool:
    """Both C functions against the torch reference, each variant on its layout, on odd shapes (N not a multiple
    of the group size, several blocks)."""
    mm, dq = pair
    g = torch.Generator().manual_seed(5)
    n, k = 37, 96
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g)
    d, m = torch.rand(n, k // QK, generator=g) * 0.1, torch.randn(n, k // QK, generator=g) * 0.1
    codes = torch.randint(-127, 128, (n, k // QK, QK), dtype=torch.int8, generator=g)
    x = torch.randn(3, k, generator=g)
    for isa in runnable_isas():
        lanes = lanes_for(isa)
        for bits, (qs, dm) in ((4, pack_q4(ggml_nibbles(q), d, m, lanes)), (8, pack_q8(codes, d, lanes))):
            w = dequantize_rows_torch(bits, qs, dm, 0, n, torch.float32)
            for out_dtype in (torch.float32, torch.bfloat16):
                got = torch.empty(n, k, dtype=out_dtype)
                to_bf16 = int(out_dtype == torch.bfloat16)
                dq(bits, qs.data_ptr(), dm.data_ptr(), k, 0, n, got.data_ptr(), to_bf16, isa, 1)
                if not torch.equal(got, w.to(out_dtype)):
                    return False
            y = torch.empty(3, n)
            mm(bits, x.data_ptr(), 0, 3, k, qs.data_ptr(), dm.data_ptr(), n, y.data_ptr(), 0, isa, 1)
            ref = x @ w.T
            if (y - ref).abs().max().item() > 0.03 * ref.abs().max().item():
                return False
    return True


def runnable_isas() -> list[int]:
    """The qmatmul.c variants this CPU can execute (under EDGELLM_ISA's cap): 0 AVX2, 1 AVX-VNNI, 2 AVX512-VNNI."""
    return [i for i, lvl in enumerate(("avx2", "avx_vnni", "avx512_vnni")) if cpu.has(lvl)]


def available() -> bool:
    return _c_kernels() is not None


def qmatmul_reference(x: torch.Tensor, qs: torch.Tensor, dm: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """What the kernel computes, in torch: activations quantized to int8 per block of 32 (scale max|x|/127,
    round half to even), times the dequantized weight, in fp32."""
    xf = x.float().reshape(*x.shape[:-1], -1, QK)
    d = xf.abs().amax(-1, keepdim=True) / 127
    xq = torch.where(d > 0, torch.round(xf / torch.where(d > 0, d, 1)), 0) * d
    w = dequantize_rows_torch(bits, qs, dm, 0, n, torch.float32)
    return (xq.reshape(x.shape).float() @ w.T).to(x.dtype)


_OP_IN_CPP = False  # True once csrc/qmatmul_op.cpp defined torch.ops.edgellm.qmatmul


def _qmatmul_cpu(x: torch.Tensor, qs: torch.Tensor, dm: torch.Tensor, bits: int, n: int, isa: int) -> torch.Tensor:
    fns = _c_kernels()
    k = x.shape[-1]
    if fns is None or x.dtype not in (torch.float32, torch.bfloat16):
        w = dequantize_rows_torch(bits, qs, dm, 0, n, torch.float32)
        return (x.float() @ w.T).to(x.dtype)
    x2 = x.reshape(-1, k).contiguous()
    y = torch.empty(x2.shape[0], n, dtype=x.dtype)
    bf16 = int(x.dtype == torch.bfloat16)
    rc = fns[0](bits, x2.data_ptr(), bf16, x2.shape[0], k, qs.data_ptr(), dm.data_ptr(), n, y.data_ptr(), bf16,
                isa, torch.get_num_threads())
    if rc != 0:
        raise MemoryError("edgellm::qmatmul: out of memory")
    return y.reshape(*x.shape[:-1], n)


def dequantize_rows(bits: int, qs: torch.Tensor, dm: torch.Tensor, k: int, n0: int, n1: int,
                    dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """Rows n0:n1 (n0 a multiple of the group size) as (n1 - n0, k) in dtype: the C pass where built (fp32/bf16),
    else torch. out: a contiguous (n1 - n0, k) tensor of dtype to write into (the prefill path reuses one scratch
    buffer)."""
    fns = _c_kernels()
    isa = 2 if lanes_of(dm) == R16 else 0  # the C pass reads 16-row groups with AVX-512, 4-row ones with AVX2
    if fns is None or dtype not in (torch.float32, torch.bfloat16) or isa not in runnable_isas():
        w = dequantize_rows_torch(bits, qs, dm, n0, n1, dtype)
        return w if out is None else out.copy_(w)
    if out is None:
        out = torch.empty(n1 - n0, k, dtype=dtype)
    assert out.is_contiguous() and out.shape == (n1 - n0, k) and out.dtype == dtype
    fns[1](bits, qs.data_ptr(), dm.data_ptr(), k, n0, n1, out.data_ptr(), int(dtype == torch.bfloat16), isa,
           torch.get_num_threads())
    return out


_LIB: torch.library.Library | None = None


def _fake(x: torch.Tensor, qs: torch.Tensor, dm: torch.Tensor, bits: int, n: int, isa: int) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], n)


def register_ops() -> None:
    """Define `torch.ops.edgellm.qmatmul(x, qs, dm, bits, n, isa)` -> x @ W^T in x's dtype, once per process:
    in C++ where csrc/qmatmul_op.cpp could be built, else in Python (ctypes, or torch without a compiler)."""
    global _LIB
    if _LIB is not None:
        return
    _c_kernels()  # loads the C++ operator library when it can be built
    if _OP_IN_CPP:
        _LIB = torch.library.Library("edgellm", "FRAGMENT")
    else:
        _LIB = torch.library.Library("edgellm", "DEF")
        _LIB.define("qmatmul(Tensor x, Tensor qs, Tensor dm, int bits, int n, int isa) -> Tensor")
        _LIB.impl("qmatmul", _qmatmul_cpu, "CPU")
    torch.library.register_fake("edgellm::qmatmul", _fake, lib=_LIB)


def qmatmul(x: torch.Tensor, qs: torch.Tensor, dm: torch.Tensor, bits: int, n: int, isa: int | None = None
            ) -> torch.Tensor:
    """x (..., K) fp32/bf16 contiguous, K % 32 == 0 -> (..., n): the int8-activation kernel (see module doc).
    isa: the variant (default: the fastest for the weight's layout); it must read that layout."""
    register_ops()
    if isa is None:
        isa = max(kernel_isa(lanes_of(dm)), 0)
    if lanes_for(isa) != lanes_of(dm):
        raise ValueError(f"qmatmul: kernel variant {isa} reads {lanes_for(isa)}-row groups, the weight has "
                         f"{lanes_of(dm)}")
    return torch.ops.edgellm.qmatmul(x, qs, dm, bits, n, isa)
