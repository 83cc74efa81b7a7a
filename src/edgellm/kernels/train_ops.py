"""RMSNorm, SiLU(gate) * up, RoPE on the fused q/k/v projection and LoRA's dropout for training, as autograd
Functions over csrc/pointwise.c, and the cross-entropy of a chunk of logits with its gradient in one call.

Why: eager torch runs each of these as several passes over the activations forward (bf16 casts, pow, mean,
rsqrt, multiplies) and more backward, and keeps fp32 copies for the backward. On the default model (4 x 256 tokens,
bf16, 2 threads) RMSNorm forward + backward took 3.0 ms (61 per step) and SiLU-gate 3.3 ms (30 per step): ~0.28 s of
a 1.8 s LoRA step. Here each is one pass forward (the inference kernel: the same values as the eager formula) and
one pass backward, and only the layer input is kept. Dropout's mask is a hash of (seed, element index), seed drawn
from torch's generator (so runs are reproducible and resumable): one pass each way and no mask kept (torch's
uniform draws were 1.5 ms of the 2.5 ms a LoRA dropout took per layer). The cross-entropy replaces the fp32 copy
of the logits, log_softmax and its backward (~0.15 s of a step: 49,152 logits per token) by two passes per row.
Together with model._BlockedAttention and lora.LoRALinear's two-product update, a LoRA step of the default model
(4 x 256 tokens, bf16, AMX) went from 1.80 to 1.07-1.10 s (docs/FINETUNING.md, session 14).

The backward kernels compute in fp32 and round once (autograd's bf16 path rounds its intermediates), so gradients
differ from eager torch's by about one bf16 rounding step in bf16 and by float noise in fp32 (checked against fp32
autograd when the library loads). RMSNorm's weight must be frozen (LoRA/QLoRA): a trainable weight keeps the eager
path, as do torch.compile traces and dtypes other than fp32/bf16.
"""

from __future__ import annotations

import ctypes
import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F

from . import native


class _Kernels(NamedTuple):
    forward: native.Pointwise  # rmsnorm, silu_mul, rope_ (the inference kernels)
    rmsnorm_backward: ctypes._CFuncPtr
    silu_mul_backward: ctypes._CFuncPtr
    dropout: ctypes._CFuncPtr
    cross_entropy: ctypes._CFuncPtr


@functools.cache
def _kernels() -> _Kernels | None:
    """csrc/pointwise.c's training kernels, checked against autograd, or None (reason in native.reasons)."""
    forward = native.pointwise()
    fns = native._functions("pointwise", "edgellm_rmsnorm_backward", "edgellm_silu_mul_backward", "edgellm_dropout",
                            "edgellm_cross_entropy")
    if forward is None or fns is None:
        return None
    rms_bwd, silu_bwd, drop, ce = fns
    rms_bwd.restype = silu_bwd.restype = drop.restype = None
    ce.restype = ctypes.c_int
    ce.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64] + [ctypes.c_void_p] * 3 + [
        ctypes.c_int]
    drop.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint32, ctypes.c_uint32,
                     ctypes.c_float, ctypes.c_int]
    rms_bwd.argtypes = [ctypes.c_int] + [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 2 + [ctypes.c_float, ctypes.c_int]
    silu_bwd.argtypes = [ctypes.c_int] + [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 2 + [ctypes.c_int]
    kernels = _Kernels(forward, rms_bwd, silu_bwd, drop, ce)
    return native._verified("pointwise_backward", kernels, _self_check)


def _bf16(t: torch.Tensor) -> int:
    return int(t.dtype == torch.bfloat16)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:  # noqa: ANN001
        forward = _kernels().forward
        ctx.save_for_backward(x, weight)
        ctx.eps = eps
        return forward.rmsnorm(x, weight, eps)

    @staticmethod
    def backward(ctx, gy: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # noqa: ANN001
        x, weight = ctx.saved_tensors
        gy = gy.to(x.dtype).contiguous()
        dx = torch.empty_like(x)
        C = x.shape[-1]
        _kernels().rmsnorm_backward(_bf16(x), x.data_ptr(), weight.data_ptr(), gy.data_ptr(), dx.data_ptr(),
                                    x.numel() // C, C, ctx.eps, torch.get_num_threads())
        return dx, None, None


class _SiluMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_up: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        forward = _kernels().forward
        ctx.save_for_backward(gate_up)
        return forward.silu_mul(gate_up)

    @staticmethod
    def backward(ctx, ga: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        (gate_up,) = ctx.saved_tensors
        ga = ga.to(gate_up.dtype).contiguous()
        dgu = torch.empty_like(gate_up)
        two_i = gate_up.shape[-1]
        _kernels().silu_mul_backward(_bf16(gate_up), gate_up.data_ptr(), ga.data_ptr(), dgu.data_ptr(),
                                     gate_up.numel() // two_i, two_i // 2, torch.get_num_threads())
        return dgu


class _Dropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, seed: int, threshold: int, scale: float) -> torch.Tensor:  # noqa: ANN001
        ctx.mask = seed, threshold, scale
        return _apply_mask(x, seed, threshold, scale)

    @staticmethod
    def backward(ctx, gy: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:  # noqa: ANN001
        return _apply_mask(gy.contiguous(), *ctx.mask), None, None, None


def _apply_mask(x: torch.Tensor, seed: int, threshold: int, scale: float) -> torch.Tensor:
    out = torch.empty_like(x)
    _kernels().dropout(_bf16(x), x.data_ptr(), out.data_ptr(), x.numel(), seed, threshold, scale,
                       torch.get_num_threads())
    return out


def dropout(x: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor | None:
    """Inverted dropout (keep with probability 1 - p, scale 1 / (1 - p)) of x, or None where the kernel does not
    apply; the seed comes from `generator` (torch's default one when None)."""
    if not 0 < p < 1 or not _usable(x) or x.numel() >= 1 << 32:
        return None
    seed = int(torch.randint(0, 1 << 32, (), dtype=torch.int64, generator=generator))
    return _Dropout.apply(x.contiguous(), seed, min(round(p * 2 ** 32), 2 ** 32 - 1), 1.0 / (1.0 - p))


def cross_entropy_available(dtype: torch.dtype) -> bool:
    return dtype in (torch.float32, torch.bfloat16) and not torch.compiler.is_compiling() and _kernels() is not None


def cross_entropy_(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor | None:
    """Per-row cross-entropy (rows,) fp32 of logits (rows, V) against labels (rows,), its gradient (softmax -
    one-hot) written over the logits in place; None (logits untouched) where the kernel does not apply. A label
    outside the vocabulary raises."""
    if logits.dim() != 2 or not logits.is_contiguous() or not _usable(logits):
        return None
    labels = labels.to(torch.int64).contiguous()
    loss = torch.empty(logits.shape[0], dtype=torch.float32)
    if _kernels().cross_entropy(_bf16(logits), logits.data_ptr(), logits.shape[0], logits.shape[1], labels.data_ptr(),
                     loss.data_ptr(), logits.data_ptr(), torch.get_num_threads()):
        raise IndexError(f"a label is outside the vocabulary of {logits.shape[1]} tokens")
    return loss


class _RopeQKV(torch.autograd.Function):
    """qkv (B, T, (H + 2 Hkv) D) -> q (B, H, T, D), k, v (B, Hkv, T, D), q and k rotated (the C kernel: the same bits
    as model.apply_rope). Backward is the transposed rotation (sin negated) of dq and dk and a copy of dv into one
    (B, T, ...) gradient: two passes, where autograd of the slices, views and apply_rope's cat made several
    zero-filled full-size gradients and summed them."""

    @staticmethod
    def forward(ctx, qkv: torch.Tensor, heads: int, kv_heads: int, cos: torch.Tensor,  # noqa: ANN001
                sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, T, W = qkv.shape
        D = W // (heads + 2 * kv_heads)
        rot = qkv.clone()
        if not native.pointwise().rope_(rot, heads + kv_heads, D, cos, sin):
            raise RuntimeError("rope kernel declined its inputs")  # checked by rope_qkv before
        ctx.save_for_backward(cos, sin)
        ctx.dims = heads, kv_heads, D
        x = rot.view(B, T, heads + 2 * kv_heads, D).transpose(1, 2)      # (B, heads, T, D) views
        return x[:, :heads], x[:, heads:heads + kv_heads], x[:, heads + kv_heads:]

    @staticmethod
    def backward(ctx, dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor  # noqa: ANN001
                 ) -> tuple[torch.Tensor, None, None, None, None]:
        cos, sin = ctx.saved_tensors
        heads, kv_heads, D = ctx.dims
        B, _, T, _ = dq.shape
        g = cos.new_empty(B, T, heads + 2 * kv_heads, D)
        for grad, a, b in ((dq, 0, heads), (dk, heads, heads + kv_heads), (dv, heads + kv_heads, heads + 2 * kv_heads)):
            if grad is None:
                g[:, :, a:b] = 0
            else:
                g[:, :, a:b] = grad.transpose(1, 2)
        g = g.view(B, T, -1)
        native.pointwise().rope_(g, heads + kv_heads, D, cos, -sin)  # the rotation's transpose
        return g, None, None, None, None


def rope_qkv(qkv: torch.Tensor, heads: int, kv_heads: int, cos: torch.Tensor, sin: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(q, k, v) of the fused projection qkv (B, T, (heads + 2 kv_heads) D), q and k rotated by cos/sin (T, D) in
    qkv's dtype, with the fused backward; None where it does not apply."""
    B, T, W = qkv.shape
    D = W // (heads + 2 * kv_heads)
    if (W != (heads + 2 * kv_heads) * D or D % 2 or cos.shape != (T, D) or sin.shape != (T, D)
            or cos.dtype != qkv.dtype or sin.dtype != qkv.dtype or not _usable(qkv)):
        return None
    return _RopeQKV.apply(qkv.contiguous(), heads, kv_heads, cos.contiguous(), sin.contiguous())


def _usable(*tensors: torch.Tensor) -> bool:
    return (not torch.compiler.is_compiling() and all(t.dtype in (torch.float32, torch.bfloat16) for t in tensors)
            and _kernels() is not None)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """RMSNorm with the fused backward (model.RMSNorm's formula), or None where it does not apply (see above)."""
    if weight.requires_grad or weight.dtype != x.dtype or weight.shape != x.shape[-1:] or not _usable(x):
        return None
    return _RMSNorm.apply(x.contiguous(), weight.contiguous(), eps)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor | None:
    """silu(gate) * up of gate_up (..., 2 I) = [gate | up] with the fused backward, or None."""
    if gate_up.shape[-1] % 2 or not _usable(gate_up):
        return None
    return _SiluMul.apply(gate_up.contiguous())


def _self_check(kernels: _Kernels) -> bool:
    """Both backward kernels against fp32 autograd of the eager formulas: fp32 within 1e-5, bf16 within a bf16
    rounding step of the fp32 gradient (relative to the row's largest)."""
    _, rms_bwd, silu_bwd, drop, ce = kernels
    g = torch.Generator().manual_seed(7)
    for dtype in (torch.float32, torch.bfloat16):
        x, w = (torch.randn(5, 96, generator=g) * 3).to(dtype), (torch.rand(96, generator=g) + 0.5).to(dtype)
        gy = torch.randn(5, 96, generator=g).to(dtype)
        gu = (torch.randn(5, 2 * 80, generator=g) * 4).to(dtype)
        gu[0, :4] = torch.tensor([-200.0, 200.0, 0.0, -90.0])
        ga = torch.randn(5, 80, generator=g).to(dtype)
        x32 = x.float().requires_grad_(True)
        (w.float() * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-5))).backward(gy.float())
        gu32 = gu.float().requires_grad_(True)
        gate, up = gu32.chunk(2, dim=-1)
        (F.silu(gate) * up).backward(ga.float())
        dx, dgu = torch.empty_like(x), torch.empty_like(gu)
        rms_bwd(_bf16(x), x.data_ptr(), w.data_ptr(), gy.data_ptr(), dx.data_ptr(), 5, 96, 1e-5, 1)
        silu_bwd(_bf16(gu), gu.data_ptr(), ga.data_ptr(), dgu.data_ptr(), 5, 80, 1)
        for got, ref in ((dx, x32.grad), (dgu, gu32.grad)):
            tol = (1e-5 if dtype == torch.float32 else 2 ** -8) * ref.abs().amax(-1, keepdim=True) + 1e-6
            if not bool(((got.float() - ref).abs() <= tol).all()):
                return False
        # dropout: kept elements scaled once, dropped ones 0, about p dropped, the same mask for the same seed
        x = torch.rand(1 << 16, generator=g).to(dtype) + 1
        a, b = torch.empty_like(x), torch.empty_like(x)
        drop(_bf16(x), x.data_ptr(), a.data_ptr(), x.numel(), 12345, round(0.25 * 2 ** 32), 4 / 3, 2)
        drop(_bf16(x), x.data_ptr(), b.data_ptr(), x.numel(), 12345, round(0.25 * 2 ** 32), 4 / 3, 1)
        kept = a != 0
        if not (torch.equal(a, b) and abs(float((~kept).float().mean()) - 0.25) < 0.01
                and torch.equal(a[kept], (x[kept].float() * (4 / 3)).to(dtype))):
            return False
        # cross-entropy and its gradient against F.cross_entropy in fp32
        logits = (torch.randn(4, 300, generator=g) * 5).to(dtype)
        labels = torch.tensor([0, 299, 7, 150])
        l32 = logits.float().requires_grad_(True)
        ref = F.cross_entropy(l32, labels, reduction="none")
        ref.sum().backward()
        grad = logits.clone()
        loss = torch.empty(4)
        if ce(_bf16(logits), logits.data_ptr(), 4, 300, labels.data_ptr(), loss.data_ptr(), grad.data_ptr(), 1):
            return False
        tol = 1e-5 if dtype == torch.float32 else 2 ** -8
        if not (torch.allclose(loss, ref.detach(), rtol=1e-5, atol=1e-5)
                and torch.allclose(grad.float(), l32.grad, rtol=tol, atol=1e-6)):
            return False
    return True
