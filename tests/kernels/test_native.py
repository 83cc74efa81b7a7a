"""The C kernels (native.py + csrc/): exact int4 dequantization, bf16 attention, building and fallbacks."""

from __future__ import annotations

import subprocess

import pytest
import torch

from edgellm.kernels import native
from edgellm.kernels import torch_lowbit as K
from edgellm.quant import QLinearPerGrp, quantize
from tests.quant.conftest import rel_err


@pytest.fixture
def dequant_t():
    if not (K.int4_available() and K.int4_layout_ok()):
        pytest.skip("no packed int4 layout in this torch")
    if native._compiler() is None:
        pytest.skip("no C compiler")
    f = native.int4_dequantizer()
    assert f is not None, native.reasons["dequant_int4"]  # a compiler is here: it must build and pass its check
    return f


def _layer(n: int, k: int, bits: int, group: int, seed: int = 0) -> tuple:
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05
    qw = quantize(w, bits, group)
    return qw, QLinearPerGrp.from_quantized(qw, dtype=torch.bfloat16)


@pytest.mark.parametrize("bits,group", [(4, 32), (4, 64), (4, 128), (4, -1), (3, 64)])
@pytest.mark.parametrize("n,k", [(100, 576), (200, 1536), (72, 100), (64, 96)])
def test_matches_the_eager_dequantization_bit_for_bit(dequant_t, bits: int, group: int, n: int, k: int) -> None:
    qw, layer = _layer(n, k, bits, group)
    if layer.backend != "int4":
        pytest.skip("no int4 kernel group fits")
    g = k if group == -1 else group
    for n0, n1 in ((0, n), (64, n), (0, 64)):
        if n1 <= n0:
            continue
        got = dequant_t(layer.packed, layer.scales16, layer.zeros, k, layer.k_pad, n0, n1, g, layer.code_shift)
        assert got.shape == (k, n1 - n0) and got.dtype == torch.bfloat16
        assert torch.equal(got.t(), layer.dequantized_rows(n0, n1, torch.bfloat16))
        assert torch.equal(got.t(), qw.dequantize()[n0:n1].to(torch.bfloat16))


def test_same_result_with_one_thread(dequant_t) -> None:
    _, layer = _layer(300, 576, 4, 32)
    args = (layer.packed, layer.scales16, layer.zeros, 576, layer.k_pad, 0, 300, 32, 0)
    two = dequant_t(*args)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert torch.equal(dequant_t(*args), two)
    finally:
        torch.set_num_threads(threads)


def test_rejects_bad_requests(dequant_t) -> None:
    _, layer = _layer(100, 576, 4, 32)
    args = (layer.packed, layer.scales16, layer.zeros, 576, layer.k_pad)
    with pytest.raises(ValueError, match="rows 10:100"):
        dequant_t(*args, 10, 100, 32, 0)          # not on a 64-row block boundary
    with pytest.raises(ValueError, match="rows 0:200"):
        dequant_t(*args, 0, 200, 32, 0)           # past the last row
    with pytest.raises(ValueError, match="contiguous"):
        dequant_t(layer.packed, layer.scales16.float(), layer.zeros, 576, layer.k_pad, 0, 100, 32, 0)


def test_prefill_path_uses_it_and_agrees_with_eager(dequant_t, monkeypatch) -> None:
    qw, layer = _layer(200, 576, 4, 32)
    x = torch.randn(QLinearPerGrp.NATIVE_INT4_DENSE_FROM_ROWS, 576).to(torch.bfloat16)
    calls = []
    monkeypatch.setattr(native, "int4_dequantizer", lambda: lambda *a: calls.append(a) or dequant_t(*a))
    monkeypatch.setattr(layer, "_forward_int4", lambda x2: pytest.fail("48 rows should take the dense path"))
    fast = layer(x)
    assert calls, "the C dequantizer was not used"
    monkeypatch.setattr(native, "int4_dequantizer", lambda: None)   # eager torch dequantization instead
    monkeypatch.setattr(QLinearPerGrp, "dequant_min_tokens", 0)
    eager = layer(x)
    assert rel_err(fast, eager) < 1e-3
    assert rel_err(fast, x.float() @ qw.dequantize().T) < 1e-2
    assert layer(x.float()).dtype == torch.float32                  # fp32 inputs keep the exact eager path


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """An empty edgellm cache and no memoised build."""
    monkeypatch.setenv("EDGELLM_CACHE", str(tmp_path))
    native.int4_dequantizer.cache_clear()
    native.attention_bf16.cache_clear()
    native.attention_f32.cache_clear()
    yield tmp_path
    native.int4_dequantizer.cache_clear()
    native.attention_bf16.cache_clear()
    native.attention_f32.cache_clear()


def test_builds_once_then_reuses_the_cached_library(dequant_t, fresh, monkeypatch, capsys) -> None:
    assert native.int4_dequantizer() is not None
    assert len(list((fresh / "native").glob("dequant_int4-*.so"))) == 1
    assert "edgellm: building the dequant_int4 C kernel for this CPU (once per machine" in capsys.readouterr().err
    native.int4_dequantizer.cache_clear()

    def no_compiler(*a, **k):
        raise AssertionError("recompiled although a built library was cached")

    monkeypatch.setattr(subprocess, "run", no_compiler)
    assert native.int4_dequantizer() is not None
    assert capsys.readouterr().err == ""  # no notice when nothing is built


def test_falls_back_with_a_reason(fresh, monkeypatch) -> None:
    if not (K.int4_available() and K.int4_layout_ok()):
        pytest.skip("no packed int4 layout in this torch")
    monkeypatch.setenv("EDGELLM_NATIVE", "0")
    assert native.int4_dequantizer() is None and native.reasons["dequant_int4"] == "EDGELLM_NATIVE=0"
    monkeypatch.delenv("EDGELLM_NATIVE")
    native.int4_dequantizer.cache_clear()
    monkeypatch.setattr(native, "_compiler", lambda: None)
    assert native.int4_dequantizer() is None and "no C compiler" in native.reasons["dequant_int4"]
    native.int4_dequantizer.cache_clear()
    monkeypatch.setattr(native, "_compiler", lambda: "/bin/false")   # a "compiler" that always fails
    assert native.int4_dequantizer() is None and "building dequant_int4 failed" in native.reasons["dequant_int4"]
    native.int4_dequantizer.cache_clear()
    monkeypatch.undo()
    monkeypatch.setenv("EDGELLM_CACHE", str(fresh))
    if native._compiler() is not None:
        monkeypatch.setattr(native, "_self_check", lambda f: False)  # a build that computes wrong values
        assert native.int4_dequantizer() is None and "disagreed" in native.reasons["dequant_int4"]
    # without the kernel the layer still works (eager dequantization)
    native.int4_dequantizer.cache_clear()
    monkeypatch.setattr(native, "_compiler", lambda: None)
    qw, layer = _layer(100, 576, 4, 32)
    x = torch.randn(200, 576).to(torch.bfloat16)
    assert rel_err(layer(x), x.float() @ qw.dequantize().T) < 1e-2


# ------------------------------------------------------------------------------------------------ attention
KERNELS = {"bf16": ("attention_bf16", torch.bfloat16, 0.03, "AVX512-BF16"),
           "f32": ("attention_f32", torch.float32, 1e-5, "AVX2")}


@pytest.fixture(params=list(KERNELS))
def attend(request):
    """(kernel, dtype, tolerance vs fp32 SDPA) for each C attention kernel this CPU can run."""
    name, dtype, tol, isa = KERNELS[request.param]
    if native._compiler() is None:
        pytest.skip("no C compiler")
    f = getattr(native, name)()
    if f is None and isa in native.reasons[name]:
        pytest.skip(native.reasons[name])
    assert f is not None, native.reasons[name]
    return f, dtype, tol


@pytest.mark.parametrize("B,H,Hkv,T,start", [(1, 9, 3, 300, 0), (2, 4, 4, 130, 0), (3, 8, 2, 70, 37),
                                             (1, 9, 3, 260, 129), (1, 9, 3, 1, 0), (1, 2, 1, 17, 500)])
def test_attention_matches_masked_sdpa(attend, B, H, Hkv, T, start):
    import torch.nn.functional as F

    fn, dtype, tol = attend
    g = torch.Generator().manual_seed(T + start)
    L = start + T
    q = torch.randn(B, T, H, 64, generator=g).transpose(1, 2)  # (B, H, T, D), non-contiguous like the model's
    k, v = torch.randn(2, B, Hkv, L + 7, 64, generator=g)       # a cache longer than needed
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    mask = torch.arange(L)[None, :] <= torch.arange(start, L)[:, None]
    ref = F.scaled_dot_product_attention(q.float(), k[:, :, :L].float(), v[:, :, :L].float(), attn_mask=mask,
                                         enable_gqa=True)
    got = fn(q, k, v, start)
    assert got.shape == (B, T, H, 64) and got.is_contiguous() and got.dtype == dtype
    assert (got.float() - ref.transpose(1, 2)).abs().max().item() < tol


def test_attention_over_packed_rows_skips_the_other_segments(attend):
    """Packed rows (eval/engine.py): a query sees the row's prefix and its own segment only, as SDPA with the
    same explicit mask; the mask really bites (without it the answer differs); a plain row in the same call."""
    import torch.nn.functional as F

    fn, dtype, tol = attend
    g = torch.Generator().manual_seed(9)
    B, H, Hkv, T = 2, 6, 2, 90
    q = torch.randn(B, T, H, 64, generator=g).transpose(1, 2).to(dtype)
    k, v = (t.to(dtype) for t in torch.randn(2, B, Hkv, T, 64, generator=g))
    # row 0: a 21-token prefix, then segments of 30, 1 and 38 tokens; row 1: one plain sequence
    lo = torch.tensor([[0] * 21 + [21] * 30 + [51] + [52] * 38, [0] * T])
    shared = torch.tensor([21, 0])
    got = fn(q, k, v, 0, (lo, shared))
    mask = native.segment_mask(T, 0, (lo, shared))                          # (B, 1, T, T)
    assert mask[0, 0, 60, 30] == 0 and mask[0, 0, 60, 10] and mask[0, 0, 60, 55] and mask[1, 0, 60, 30]
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, enable_gqa=True)
    assert (got.float() - ref.transpose(1, 2)).abs().max().item() < tol
    plain = fn(q, k, v, 0)
    assert (plain[0, 51:] - got[0, 51:]).abs().max().item() > 10 * tol     # the hole changes the answer
    assert torch.equal(plain[1], got[1]) and torch.equal(plain[0, :51], got[0, :51])  # prefix, first segment
    assert fn(q, k, v, 0, (lo[:, :10], shared)) is None                    # lo must be (B, T)


def test_attention_reads_strided_keys_and_declines_what_it_cannot_do(attend):
    fn, dtype, _ = attend
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(1, 40, 4 + 2 * 2, 64, generator=g).to(dtype)     # the fused projection's layout
    q, k, v = (qkv[:, :, a:b].transpose(1, 2) for a, b in ((0, 4), (4, 6), (6, 8)))
    got = fn(q, k, v, 0)
    want = fn(q.contiguous(), k.contiguous(), v.contiguous(), 0)
    assert torch.equal(got, want)
    other = torch.float32 if dtype == torch.bfloat16 else torch.bfloat16
    assert fn(q.to(other), k.to(other), v.to(other), 0) is None           # not its dtype
    assert fn(q[..., :32], k[..., :32], v[..., :32], 0) is None            # head_dim 32
    assert fn(q, k[:, :, :30], v[:, :, :30], 0) is None                    # cache shorter than the positions


def test_model_prefill_uses_it_and_stays_close_to_the_torch_path(attend, monkeypatch):
    from edgellm import model

    fn, dtype, tol = attend
    name = "attention_bf16" if dtype == torch.bfloat16 else "attention_f32"
    calls = []
    monkeypatch.setattr(native, name, lambda: lambda *a: calls.append(1) or fn(*a))
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 9, 200, 64, generator=g).to(dtype)
    k, v = torch.randn(2, 1, 3, 256, 64, generator=g).to(dtype)
    fast = model.causal_attention(q, k, v, 0)
    assert calls and fast.shape == (1, 200, 9, 64)
    monkeypatch.setattr(native, name, lambda: None)
    slow = model.causal_attention(q, k, v, 0)
    if dtype == torch.float32:
        assert slow is None  # the model's SDPA call takes over
        slow = torch.nn.functional.scaled_dot_product_attention(q, k[:, :, :200], v[:, :, :200], is_causal=True,
                                                                enable_gqa=True).transpose(1, 2)
    assert (fast.float() - slow.float()).abs().max().item() < tol


def test_attention_falls_back_with_a_reason(fresh, monkeypatch):
    monkeypatch.setenv("EDGELLM_NATIVE", "0")
    assert native.attention_bf16() is None and native.reasons["attention_bf16"] == "EDGELLM_NATIVE=0"
    monkeypatch.delenv("EDGELLM_NATIVE")
    native.attention_bf16.cache_clear()
    monkeypatch.setattr(native, "_compiler", lambda: "/bin/false")
    assert native.attention_bf16() is None and "building attention_bf16 failed" in native.reasons["attention_bf16"]
    native.attention_bf16.cache_clear()
    monkeypatch.setattr(native, "_compiler", lambda: None)
    from edgellm import model

    g = torch.Generator().manual_seed(2)
    q = torch.randn(1, 4, 20, 64, generator=g).bfloat16()
    k, v = torch.randn(2, 1, 2, 20, 64, generator=g).bfloat16()
    assert model.causal_attention(q, k, v, 0).shape == (1, 20, 4, 64)
    assert "no C compiler" in native.reasons["attention_bf16"]           # so that was the torch path


@pytest.mark.parametrize("cap,native_march", [(None, True), ("avx512_bf16", True), ("amx", True),
                                               ("avx512_vnni", True), ("avx_vnni", False), ("avx2", False)])
def test_a_forced_path_builds_for_the_baseline_only_below_avx512(monkeypatch, cap, native_march):
    """EDGELLM_ISA=avx2 must not let the compiler emit AVX-512; a cap at an AVX-512 level keeps the kernels that
    level runs (the AVX512-BF16 attention is compiled out of an x86-64-v3 build)."""
    monkeypatch.setattr(native.cpu, "forced", lambda: cap)
    assert ("-march=native" in native._flag_sets("attention_bf16")[0]) == native_march
    assert "-march=x86-64-v3" in native._flag_sets("qmatmul")[0]  # picks its variants at run time, always


def test_status_line_names_each_kernel_tried(monkeypatch):
    monkeypatch.setattr(native, "reasons", {})
    assert native.status() == ""
    monkeypatch.setattr(native, "reasons", {"dequant_int4": "", "attention_bf16": "EDGELLM_NATIVE=0"})
    assert native.status() == "C kernels: attention_bf16 off (EDGELLM_NATIVE=0), dequant_int4 on"


# ------------------------------------------------------------------------------------------------ decode attention
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 0.02)])
def test_decode_attention_matches_sdpa_per_row_and_ignores_the_other_rows(dtype, tol):
    if native._compiler() is None:
        pytest.skip("no C compiler")
    attend = native.decode_attention()
    assert attend is not None, native.reasons["decode_attention"]  # plain C: builds wherever a compiler is
    g = torch.Generator().manual_seed(9)
    k, v = torch.randn(2, 5, 3, 300, 64, generator=g).to(dtype)            # (P, Hkv, S, D)
    q = torch.randn(4, 9, 64, generator=g).to(dtype)                        # (B, H, D)
    rows, lo, hi = [4, 1, 0, 2], [0, 0, 100, 7], [299, 0, 163, 7]          # full, one key, a window, one key
    got = attend(q, k, v, rows, lo, hi)
    torch.testing.assert_close(got.float(), native._decode_attention_reference(q, k, v, rows, lo, hi),
                               atol=tol, rtol=0)
    for b in range(4):
        assert torch.equal(attend(q[b:b + 1].contiguous(), k, v, rows[b:b + 1], lo[b:b + 1], hi[b:b + 1])[0], got[b])
    assert attend(q, k, v, rows, lo, [300, 0, 163, 7]) is None            # a key past the cache: declined
    assert attend(q, k, v, [5, 1, 0, 2], lo, hi) is None                  # a row past the pool
    assert attend(q.float() if dtype == torch.bfloat16 else q.bfloat16(), k, v, rows, lo, hi) is None


@pytest.mark.parametrize("H,Hkv,D", [(4, 4, 128), (10, 5, 128), (9, 3, 64), (8, 2, 64), (14, 2, 64)])
def test_decode_attention_heads_sharing_key_loads(H, Hkv, D):
    """Query heads of a kv head go through the keys three at a time (one load of each key for all): groups of 1,
    2, 3, 4 (3 + 1) and 7 (3 + 3 + 1) heads, head dims 64 and 128, against the reference."""
    if native._compiler() is None:
        pytest.skip("no C compiler")
    attend = native.decode_attention()
    g = torch.Generator().manual_seed(H * D)
    k, v = torch.randn(2, 2, Hkv, 90, D, generator=g)
    q = torch.randn(2, H, D, generator=g)
    rows, lo, hi = [1, 0], [0, 3], [89, 44]
    torch.testing.assert_close(attend(q, k, v, rows, lo, hi), native._decode_attention_reference(q, k, v, rows, lo, hi),
                               atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------ pointwise
@pytest.fixture
def pointwise():
    if native._compiler() is None:
        pytest.skip("no C compiler")
    kernels = native.pointwise()
    assert kernels is not None, native.reasons["pointwise"]  # plain C: builds wherever a compiler is
    return kernels


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pointwise_kernels_match_the_eager_formulas(pointwise, dtype):
    from edgellm.model import RMSNorm

    g = torch.Generator().manual_seed(11)
    x = (torch.randn(3, 37, 576, generator=g) * 4).to(dtype)
    norm = RMSNorm(576, 1e-5).to(dtype)
    norm.weight.data = (torch.rand(576, generator=g) + 0.5).to(dtype)
    with torch.inference_mode():
        got = pointwise.rmsnorm(x, norm.weight, 1e-5)
        x32 = x.float()
        want = norm.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype)
        gu = (torch.randn(3, 37, 2 * 100, generator=g) * 5).to(dtype)
        gu[0, 0, :3] = torch.tensor([-500.0, 500.0, 0.0])                   # exp's clamps, silu(0) = 0
        act = pointwise.silu_mul(gu)
        gate, up = gu.chunk(2, dim=-1)
        act_want = torch.nn.functional.silu(gate) * up
    assert got.dtype == dtype and act.dtype == dtype and act.shape == (3, 37, 100)
    if dtype == torch.bfloat16:  # every rounding step as eager: equal except where a sum lands on a rounding tie
        assert (got != want).float().mean() < 1e-3 and (act != act_want).float().mean() < 1e-3
    torch.testing.assert_close(got.float(), want.float(), rtol=2 ** -8 if dtype == torch.bfloat16 else 1e-5,
                               atol=1e-6)
    torch.testing.assert_close(act.float(), act_want.float(), rtol=2 ** -8 if dtype == torch.bfloat16 else 1e-5,
                               atol=1e-6)
    assert act[0, 0, 0] == 0 and act[0, 0, 2] == 0                        # silu(-500) * up, silu(0) * up
    # a row's result does not depend on the rows around it
    assert torch.equal(pointwise.rmsnorm(x[1, 5:6].contiguous(), norm.weight, 1e-5)[0], got[1, 5])
    assert torch.equal(pointwise.silu_mul(gu[2, 7:8].contiguous())[0], act[2, 7])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_kernel_equals_apply_rope_bit_for_bit(pointwise, dtype):
    from edgellm.model import apply_rope

    g = torch.Generator().manual_seed(12)
    B, T, H, Hkv, D = 2, 19, 6, 2, 64
    qkv = (torch.randn(B, T, (H + 2 * Hkv) * D, generator=g) * 3).to(dtype)
    cos, sin = (torch.randn(T, D, generator=g).to(dtype) for _ in range(2))
    want = apply_rope(qkv[..., :(H + Hkv) * D].view(B, T, H + Hkv, D), cos[:, None], sin[:, None])
    got = qkv.clone()
    assert pointwise.rope_(got, H + Hkv, D, cos, sin)
    assert torch.equal(got[..., :(H + Hkv) * D].view(B, T, H + Hkv, D), want)
    assert torch.equal(got[..., (H + Hkv) * D:], qkv[..., (H + Hkv) * D:])  # v untouched
    # declined: a layout it cannot address, tables of another dtype or length (nothing is written)
    before = qkv.clone()
    assert not pointwise.rope_(qkv[:, ::2], H + Hkv, D, cos[::2].contiguous(), sin[::2].contiguous())
    assert not pointwise.rope_(qkv, H + Hkv, D, cos.double(), sin.double())
    assert not pointwise.rope_(qkv, H + Hkv, D, cos[1:], sin[1:])
    assert torch.equal(qkv, before)


def test_pointwise_kernels_decline_what_they_cannot_do(pointwise):
    x = torch.randn(4, 64)
    assert pointwise.rmsnorm(x, torch.ones(64, dtype=torch.bfloat16), 1e-5) is None  # weight of another dtype
    assert pointwise.rmsnorm(x.t(), torch.ones(4), 1e-5) is None                     # not contiguous
    assert pointwise.silu_mul(torch.randn(4, 63)) is None                            # odd width
    assert pointwise.silu_mul(torch.randn(4, 64, dtype=torch.float64)) is None


def test_model_uses_the_pointwise_kernels_only_outside_autograd_and_compile(pointwise, monkeypatch):
    from edgellm.model import MLP, RMSNorm

    calls = []
    spy = native.Pointwise(lambda *a: calls.append("norm") or pointwise.rmsnorm(*a),
                           lambda *a: calls.append("act") or pointwise.silu_mul(*a),
                           lambda *a: calls.append("rope") or pointwise.rope_(*a))
    monkeypatch.setattr(native, "pointwise", lambda: spy)
    # under autograd the fused training ops (kernels/train_ops.py, tested there) may call the same kernels from an
    # autograd Function; which table they hold depends on test order, so they are off here
    from edgellm.kernels import train_ops

    monkeypatch.setattr(train_ops, "_kernels", lambda: None)
    cfg = type("Cfg", (), {"hidden_size": 64, "intermediate_size": 96})()
    norm, mlp = RMSNorm(64, 1e-6), MLP(cfg)
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        fast = mlp(norm(x))
    assert calls == ["norm", "act"]
    calls.clear()
    slow = mlp(norm(x))                               # parameters need gradients: torch's ops, with backward
    assert calls == [] and slow.requires_grad
    torch.testing.assert_close(fast, slow.detach(), rtol=1e-5, atol=1e-6)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # while torch.compile traces: torch's ops
    with torch.no_grad():
        traced = mlp(norm(x))
    assert calls == []
    torch.testing.assert_close(fast, traced, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_rotates_in_c_with_the_same_bits(pointwise, monkeypatch, dtype):
    """Attention.forward hands RoPE to the kernel (in place on the fused projection) outside autograd, and the
    logits are those of the torch formula, bit for bit."""
    from tests.conftest import random_llama

    model = random_llama(vocab=96, head_dim=16, dtype=dtype, seed=3, max_seq_len=64)
    ids = torch.randint(0, 96, (2, 21))
    calls = []
    spy = pointwise._replace(rope_=lambda *a: calls.append("rope") or pointwise.rope_(*a))
    monkeypatch.setattr(native, "pointwise", lambda: spy)
    with torch.no_grad():
        fast = model(ids)
    assert calls.count("rope") == model.config.num_layers
    monkeypatch.setattr(native, "pointwise", lambda: pointwise._replace(rope_=lambda *a: False))
    with torch.no_grad():
        slow = model(ids)                             # the kernel declines: torch's apply_rope
    assert torch.equal(fast, slow)
