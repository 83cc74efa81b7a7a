"""The fused training ops (kernels/train_ops.py) and the blocked attention's written-out backward against eager
torch autograd, and a LoRA step of a tiny model with and without them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from edgellm import model as M
from edgellm.kernels import train_ops
from edgellm.model import apply_rope

from ..conftest import random_llama

pytestmark = pytest.mark.skipif(train_ops._kernels() is None, reason="the pointwise C kernels could not be built")

DTYPES = [torch.float32, torch.bfloat16]


def close(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    """fp32: float noise; bf16: within ~2 bf16 rounding steps of the tensor's scale (the kernels round once, autograd
    at every intermediate)."""
    tol = 2e-5 if dtype == torch.float32 else 2 ** -7
    got, ref = got.detach().float(), ref.detach().float()
    scale = ref.abs().amax().clamp_min(1e-6)
    assert float((got - ref).abs().amax() / scale) <= tol


@pytest.mark.parametrize("dtype", DTYPES)
def test_rmsnorm_and_silu_gate_match_eager_autograd(dtype):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 33, 576, generator=g) * 3).to(dtype).requires_grad_(True)
    w = (torch.rand(576, generator=g) + 0.5).to(dtype)
    gy = torch.randn(2, 33, 576, generator=g).to(dtype)
    y = train_ops.rmsnorm(x, w, 1e-5)
    assert y.grad_fn is not None and "RMSNorm" in type(y.grad_fn).__name__
    y.backward(gy)
    x2 = x.detach().clone().requires_grad_(True)
    x32 = x2.float()
    ref = w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype)
    ref.backward(gy)
    close(y.detach(), ref.detach(), dtype)
    close(x.grad, x2.grad, dtype)
    assert train_ops.rmsnorm(x, w.clone().requires_grad_(True), 1e-5) is None  # a trainable weight: eager path

    gu = (torch.randn(2, 33, 2 * 160, generator=g) * 4).to(dtype).requires_grad_(True)
    ga = torch.randn(2, 33, 160, generator=g).to(dtype)
    a = train_ops.silu_mul(gu)
    a.backward(ga)
    gu2 = gu.detach().clone().requires_grad_(True)
    gate, up = gu2.chunk(2, dim=-1)
    ref = F.silu(gate) * up
    ref.backward(ga)
    close(a.detach(), ref.detach(), dtype)
    close(gu.grad, gu2.grad, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_on_the_fused_projection_is_apply_rope_both_ways(dtype):
    """Forward and backward bit for bit: the backward is the same products and sums as autograd's."""
    g = torch.Generator().manual_seed(1)
    B, T, H, Hkv, D = 2, 7, 6, 2, 64
    qkv = torch.randn(B, T, (H + 2 * Hkv) * D, generator=g).to(dtype).requires_grad_(True)
    angle = torch.rand(T, D // 2, generator=g) * 3
    cos = torch.cat([angle.cos(), angle.cos()], -1).to(dtype)
    sin = torch.cat([-angle.sin(), angle.sin()], -1).to(dtype)
    grads = [torch.randn(B, n, T, D, generator=g).to(dtype) for n in (H, Hkv, Hkv)]
    q, k, v = train_ops.rope_qkv(qkv, H, Hkv, cos, sin)
    torch.autograd.backward([q, k, v], grads)
    ref_in = qkv.detach().clone().requires_grad_(True)
    qk = apply_rope(ref_in[..., :(H + Hkv) * D].view(B, T, H + Hkv, D), cos[:, None], sin[:, None])
    ref = (qk[:, :, :H].transpose(1, 2), qk[:, :, H:].transpose(1, 2),
           ref_in[..., (H + Hkv) * D:].view(B, T, Hkv, D).transpose(1, 2))
    torch.autograd.backward(list(ref), grads)
    assert all(torch.equal(a, b) for a, b in zip((q, k, v), ref, strict=True))
    assert torch.equal(qkv.grad, ref_in.grad)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_and_its_gradient(dtype):
    g = torch.Generator().manual_seed(2)
    logits = (torch.randn(9, 1000, generator=g) * 6).to(dtype)
    labels = torch.randint(0, 1000, (9,), generator=g)
    ref_in = logits.float().requires_grad_(True)
    ref = F.cross_entropy(ref_in, labels, reduction="none")
    ref.sum().backward()
    grad = logits.clone()
    loss = train_ops.cross_entropy_(grad, labels)
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-5, atol=1e-5)
    close(grad, ref_in.grad, dtype)
    with pytest.raises(IndexError, match="vocabulary"):
        train_ops.cross_entropy_(logits.clone(), torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 1000]))


@pytest.mark.parametrize("dtype", DTYPES)
def test_dropout_mask_is_reproducible_and_reused_by_backward(dtype):
    x = (torch.rand(3, 50_000) + 1).to(dtype).requires_grad_(True)
    torch.manual_seed(5)
    y = train_ops.dropout(x, 0.1)
    y.backward(torch.ones_like(y))
    kept = y != 0
    assert abs(1 - float(kept.float().mean()) - 0.1) < 0.005
    scale = torch.tensor(1 / 0.9, dtype=torch.float32)  # applied in fp32, rounded once
    assert torch.equal(y[kept], (x.detach()[kept].float() * scale).to(dtype))
    assert torch.equal(x.grad, torch.where(kept, scale.to(dtype), torch.zeros((), dtype=dtype)))
    torch.manual_seed(5)
    assert torch.equal(train_ops.dropout(x.detach(), 0.1), y.detach())       # the seed comes from torch's generator
    assert not torch.equal(train_ops.dropout(x.detach(), 0.1) != 0, kept)  # ... and moves on
    assert train_ops.dropout(x, 0.0) is None and train_ops.dropout(x, 1.0) is None


@pytest.mark.parametrize("dtype", DTYPES)
def test_blocked_attention_backward_matches_autograd(dtype):
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, n, 150, 64, generator=g).to(dtype).requires_grad_(True) for n in (6, 2, 2))
    gy = torch.randn(2, 6, 150, 64, generator=g).to(dtype)
    y = M.blocked_causal_attention(q, k, v, 0)
    assert "BlockedAttention" in type(y.grad_fn).__name__
    y.backward(gy)
    ref_in = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    ref = M._blocked_forward(*ref_in, 0, None)  # autograd through the forward's own ops
    ref.backward(gy)
    assert torch.equal(y.detach(), ref.detach())
    for got, want in zip((q.grad, k.grad, v.grad), (t.grad for t in ref_in), strict=True):
        close(got, want, dtype)


def lora_grads(use_kernels: bool, monkeypatch) -> tuple[float, list[torch.Tensor]]:
    from edgellm.finetune.train import loss_sum
    from edgellm.lora import LoRASettings, inject_lora

    if not use_kernels:
        monkeypatch.setattr(train_ops, "_kernels", lambda: None)
    m = random_llama(vocab=300, head_dim=64, dtype=torch.float32, seed=4)
    mods = inject_lora(m, m.config, LoRASettings(dropout=0.0))
    g = torch.Generator().manual_seed(0)
    params = []
    for mod in mods.values():
        mod.reset_parameters(g)
        for b in mod.lora_B.values():
            torch.nn.init.normal_(b, std=0.1, generator=g)
        params += [*mod.lora_A.values(), *mod.lora_B.values()]
    for p in params:
        p.requires_grad_(True)
    m.train()
    ids = torch.randint(0, 300, (2, 40), generator=g)
    total, n = loss_sum(m, ids, ids)
    (total / n).backward()
    monkeypatch.undo()
    return float(total.detach() / n), [p.grad for p in params]


def test_a_lora_step_with_the_fused_ops_equals_eager_torch(monkeypatch):
    loss, grads = lora_grads(True, monkeypatch)
    ref_loss, ref_grads = lora_grads(False, monkeypatch)
    assert abs(loss - ref_loss) < 1e-5
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
