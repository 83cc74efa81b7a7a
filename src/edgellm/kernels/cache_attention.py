"""`torch.ops.edgellm_attention.cache_attention`: attention of T new tokens over a whole static KV cache, for the
compiled decode step (T = 1) and the speculative verify step (T > 1). C kernel: csrc/decode_attention.c, its
torch operator csrc/decode_attention_op.cpp (built and loaded by kernels/native.py).

Why a kernel: written in torch ops, the step attends over every slot of the cache bucket with a position mask,
and for T > 1 inductor's fused loop recomputes the query's RoPE for every slot and converts the bf16 cache again
for every query row (a 4-token verify cost 2.3 decode steps on the default model). The kernel visits only the
slots a query may see, and a query's arithmetic never depends on T or on the other queries: a verify step's rows
equal decode steps bit for bit, which speculative decoding's greedy identity rests on.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from . import native

_LIB: torch.library.Library | None = None


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_pos: torch.Tensor, pos: torch.Tensor,
              window: int, scale: float) -> torch.Tensor:
    """What the kernel computes, in torch (fp32 inside): q (B, T, H, D) at positions pos (T,) over cache k, v
    (>= B, Hkv, S, D) whose slot j holds position slot_pos[j] (-1: empty) -> (B, T, H, D) in q's dtype."""
    B, T, H, D = q.shape
    Hkv = k.shape[1]
    kp, qp = slot_pos[None, :], pos[:, None]
    valid = (kp >= 0) & (kp <= qp)                                        # (T, S)
    if window > 0:
        valid &= kp > qp - window
    qf = q.float().transpose(1, 2)                                        # (B, H, T, D)
    kf, vf = k[:B].float(), v[:B].float()                                 # (B, Hkv, S, D)
    y = torch.nn.functional.scaled_dot_product_attention(qf, kf, vf, attn_mask=valid, scale=scale,
                                                         enable_gqa=H != Hkv)
    return y.transpose(1, 2).to(q.dtype)


@functools.cache
def _c_function():  # noqa: ANN202 - a ctypes function
    loaded = native.decode_attention_library()
    if loaded is None:
        return None
    lib, _ = loaded
    fn = getattr(lib, "edgellm_cache_attention", None)
    if fn is None:
        native.reasons["cache_attention"] = "the decode_attention library has no edgellm_cache_attention"
        return None
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_int] + [ctypes.c_void_p] * 7 + [ctypes.c_int64] * 7 + [ctypes.c_float, ctypes.c_int]
    return fn


def _cache_attention_cpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_pos: torch.Tensor,
                         pos: torch.Tensor, window: int, scale: float) -> torch.Tensor:
    """The operator's CPU implementation where the C++ wrapper could not be built: the C kernel through ctypes
    (registered only where `_c_function()` exists)."""
    fn = _c_function()
    B, T, H, D = q.shape
    out = torch.empty_like(q)
    rc = fn(int(q.dtype == torch.bfloat16), q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(),
            slot_pos.data_ptr(), pos.data_ptr(), window, B, T, H, k.shape[1], k.shape[2], D, scale,
            torch.get_num_threads())
    if rc != 0:
        raise MemoryError("edgellm_attention::cache_attention: out of memory")
    return out


def _fake(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_pos: torch.Tensor, pos: torch.Tensor,
          window: int, scale: float) -> torch.Tensor:
    return torch.empty_like(q)


def _register() -> bool:
    """Define the operator once per process: in C++ where decode_attention_op.cpp could be built, else in Python
    over ctypes. False (reason in native.reasons["cache_attention"]) when the C kernel is not there at all."""
    global _LIB
    if _LIB is not None:
        return True
    loaded = native.decode_attention_library()
    if loaded is None or _c_function() is None:
        native.reasons.setdefault("cache_attention", native.reasons.get("decode_attention", "not built"))
        return False
    if loaded[1]:
        lib = torch.library.Library("edgellm_attention", "FRAGMENT")
    else:
        lib = torch.library.Library("edgellm_attention", "DEF")
        lib.define("cache_attention(Tensor q, Tensor k, Tensor v, Tensor slot_pos, Tensor pos, int window, "
                   "float scale) -> Tensor")
        lib.impl("cache_attention", _cache_attention_cpu, "CPU")
    torch.library.register_fake("edgellm_attention::cache_attention", _fake, lib=lib)
    _LIB = lib
    return True


def _self_check() -> bool:
    """Against the fp32 reference: both dtypes, GQA, empty and stale slots, a window, a rolling slot order, a
    batch of two; and a query's row must equal the same query verified alone."""
    g = torch.Generator().manual_seed(7)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 0.02)):
        k, v = torch.randn(2, 3, 2, 24, 64, generator=g).to(dtype)
        q = torch.randn(2, 4, 6, 64, generator=g).to(dtype)
        slot_pos = torch.tensor([20, 21, 22, 23] + list(range(4, 20)) + [-1, 30, 31, -1])
        pos = torch.tensor([17, 18, 19, 20])
        for window in (0, 9):
            got = cache_attention(q, k, v, slot_pos, pos, window)
            ref = reference(q, k, v, slot_pos, pos, window, 64 ** -0.5)
            if (got.float() - ref.float()).abs().max().item() > tol:
                return False
            alone = cache_attention(q[:1, 2:3].contiguous(), k, v, slot_pos, pos[2:3], window)
            if not torch.equal(alone[0, 0], got[0, 2]):
                return False
    return True


@functools.cache
def available() -> bool:
    """True where the C kernel and its operator are in place and agree with the reference."""
    if not _register():
        return False
    if not _self_check():
        native.reasons["cache_attention"] = "the compiled cache_attention kernel disagreed with the reference"
        return False
    native.reasons["cache_attention"] = ""
    return True


def cache_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_pos: torch.Tensor, pos: torch.Tensor,
                    window: int) -> torch.Tensor:
    """q (B, T, H, D) contiguous at positions pos (T,) over the contiguous cache k, v (>= B, Hkv, S, D) whose slot j
    holds position slot_pos[j] (-1: empty), fp32 or bf16 -> (B, T, H, D) in q's dtype. window > 0: a query at p
    sees positions > p - window only. Call only where `available()` said True (it registers the operator)."""
    return torch.ops.edgellm_attention.cache_attention(q, k, v, slot_pos, pos, window, q.shape[-1] ** -0.5)
