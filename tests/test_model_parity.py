"""Logit and greedy parity with HF transformers on random-weight tiny models of every architecture,
loaded through the HF-folder path."""

from __future__ import annotations

import os

import pytest
import torch

import edgellm
from tests.conftest import TINY_CONFIGS

transformers = pytest.importorskip("transformers")
SEQ = 80  # longer than the mistral window (16) and >= 64 decode steps


def hf_model(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32,
                                                             attn_implementation="eager").eval()


@pytest.fixture(scope="module", params=list(TINY_CONFIGS))
def pair(request, tiny_checkpoints):
    path = tiny_checkpoints[request.param]
    return request.param, edgellm.load(path, dtype="fp32"), hf_model(path)


def random_ids(seed: int = 0, n: int = SEQ) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 320, (n,), generator=g)


@torch.no_grad()
def test_full_sequence_logits_match(pair):
    name, ours, ref = pair
    ids = random_ids()
    expected = ref(ids[None]).logits[0]
    got = ours.logits(ids)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-4, name


@torch.no_grad()
def test_kv_cache_decode_matches_full_forward(pair):
    name, ours, ref = pair
    ids = random_ids(1)
    expected = ref(ids[None]).logits[0]
    model = ours.model
    model.setup_cache(1, SEQ)
    # chunked prefill of 8 tokens, then one token at a time over the remaining 72 (>= 64 cached steps)
    chunks = [model(ids[None, :8], 0, use_cache=True)[0]]
    for t in range(8, SEQ):
        chunks.append(model(ids[None, t:t + 1], t, use_cache=True)[0])
    got = torch.cat(chunks)
    assert (got - expected).abs().max().item() <= 1e-4, name


@torch.no_grad()
def test_greedy_tokens_match(pair):
    name, ours, ref = pair
    prompt = random_ids(2, 12)
    out = ref.generate(prompt[None], attention_mask=torch.ones(1, 12, dtype=torch.long), max_new_tokens=32,
                       min_new_tokens=32, do_sample=False, pad_token_id=0, eos_token_id=None)
    expected = out[0, 12:].tolist()
    got = list(ours.generator.token_stream(prompt.tolist(), edgellm.SamplingParams(max_new_tokens=32,
                                                                                    ignore_eos=True)))
    assert got == expected, name


def test_rolling_cache_is_window_sized(tiny_checkpoints):
    llm = edgellm.load(tiny_checkpoints["mistral"], dtype="fp32")
    llm.model.setup_cache(1, 200)
    cache = llm.model.layers[0].self_attn.cache
    assert cache.rolling and cache.k.shape[2] == 16


@pytest.mark.parametrize("B,H,Hkv,T,start", [(1, 9, 3, 300, 0), (2, 4, 4, 130, 0), (3, 8, 2, 70, 37),
                                             (1, 9, 3, 260, 129), (1, 9, 3, 700, 0)])  # 700: wide, then narrow
def test_blocked_attention_matches_masked_sdpa(B, H, Hkv, T, start):
    """The bf16 prefill / cached-prefix attention equals fp32 SDPA with an explicit causal mask (bf16 noise)."""
    import torch.nn.functional as F

    from edgellm.model import blocked_causal_attention

    g = torch.Generator().manual_seed(T)
    L = start + T
    q = torch.randn(B, T, H, 64, generator=g).transpose(1, 2)  # (B, H, T, D), non-contiguous like the model's
    k, v = torch.randn(2, B, Hkv, L + 7, 64, generator=g)       # a cache longer than needed
    mask = torch.arange(L)[None, :] <= torch.arange(start, L)[:, None]
    ref = F.scaled_dot_product_attention(q, k[:, :, :L], v[:, :, :L], attn_mask=mask, enable_gqa=True)
    got = blocked_causal_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), start).float()
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() < 0.03


@pytest.mark.parametrize("head_dim,dtype", [(64, torch.float32), (64, torch.bfloat16), (32, torch.float32),
                                             (32, torch.bfloat16)])
def test_packed_rows_give_each_sequence_its_own_logits(head_dim, dtype):
    """A row holding a shared prefix once, then three continuations (each at the positions after the prefix, seeing
    the prefix and itself): every token's logits are those of that sequence run alone. Head dim 64 takes the C
    attention kernels where built, 32 the masked SDPA; fp32 within float noise, bf16 within bf16 rounding."""
    from edgellm.model import Packed
    from tests.conftest import random_llama

    model = random_llama(vocab=128, head_dim=head_dim, dtype=dtype, seed=1)
    g = torch.Generator().manual_seed(2)
    prefix = torch.randint(0, 128, (13,), generator=g).tolist()
    tails = [torch.randint(0, 128, (n,), generator=g).tolist() for n in (5, 1, 9)]
    P = len(prefix)
    ids, pos, lo = list(prefix), list(range(P)), [0] * P
    for t in tails:
        lo += [len(ids)] * len(t)
        pos += list(range(P, P + len(t)))
        ids += t
    with torch.inference_mode():
        out = model(torch.tensor([ids]), packed=Packed(torch.tensor([pos]), torch.tensor([lo]),
                                                       torch.tensor([P])))[0].float()
        col = P
        for t in tails:
            alone = model(torch.tensor([prefix + t]))[0].float()
            got = torch.cat([out[:P], out[col:col + len(t)]])
            tol = 1e-4 if dtype == torch.float32 else 0.05 * alone.abs().max().item()
            assert (got - alone).abs().max().item() <= tol
            col += len(t)
    with pytest.raises(ValueError, match="packed rows"):
        model(torch.tensor([ids]), 3, packed=Packed(torch.tensor([pos]), torch.tensor([lo]), torch.tensor([P])))


def test_half_precision_training_attention_has_sdpa_gradients(monkeypatch):
    """bf16 training takes blocked_causal_attention (bf16 GEMMs with autograd) instead of torch's CPU flash kernel:
    the outputs and the q/k/v gradients match fp32 SDPA within bf16 noise, and the path is really taken."""
    from edgellm import model
    from edgellm.config import ModelConfig

    calls = []
    real = model.blocked_causal_attention
    monkeypatch.setattr(model, "blocked_causal_attention", lambda *a: calls.append(1) or real(*a))
    cfg = ModelConfig(arch="llama", vocab_size=64, hidden_size=128, intermediate_size=64, num_layers=1, num_heads=4,
                      num_kv_heads=2, head_dim=32, max_seq_len=300)
    torch.manual_seed(0)
    attn = model.Attention(cfg)
    tables = model.Transformer(cfg)
    tables.init_rope()
    cos, sin = tables.rope_cos[:200], tables.rope_sin[:200]
    x = torch.randn(2, 200, 128, requires_grad=True)
    attn_bf16 = model.Attention(cfg).bfloat16()
    attn_bf16.load_state_dict({k: v.bfloat16() for k, v in attn.state_dict().items()})
    xb = x.detach().bfloat16().requires_grad_(True)
    got = attn_bf16(xb, cos, sin, 0, False)
    assert calls, "bf16 training did not take the blocked path"
    want = attn(x, cos, sin, 0, False)                       # fp32: SDPA
    torch.testing.assert_close(got.float(), want, atol=0.03, rtol=0.05)
    grad = torch.randn_like(want)
    got.backward(grad.bfloat16())
    want.backward(grad)
    torch.testing.assert_close(xb.grad.float(), x.grad, atol=0.05 * x.grad.abs().max().item(), rtol=0.05)
    w_got, w_want = attn_bf16.qkv_proj.weight.grad.float(), attn.qkv_proj.weight.grad
    assert (w_got - w_want).abs().max() < 0.05 * w_want.abs().max()
    # past the memory budget for saved probabilities (long sequences), training keeps torch's flash kernel
    calls.clear()
    monkeypatch.setattr(model, "TRAIN_ATTN_BYTES", 2 * 4 * 200 * 200)
    attn_bf16(xb, cos, sin, 0, False).sum().backward()
    assert not calls


def onednn_emulates_bf16() -> bool:
    """AVX-512 without AVX512-BF16 (Skylake-SP to Ice Lake servers, Tiger Lake laptops; here also
    ONEDNN_MAX_CPU_ISA=AVX512_CORE[_VNNI]): oneDNN's bf16 GEMM emulates the dot products and groups a row's sums
    by the problem's shape (its keys and rows), so a row's last bits depend on the block it was computed in.
    AVX2-only CPUs (ATen's kernel) and AVX512-BF16/AMX sum a row the same way whatever the block (measured)."""
    from edgellm.kernels.cpu import cpu_flags

    flags = set(cpu_flags().split())
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    avx512 = "avx512f" in flags and (not cap or cap.startswith("AVX512") or cap in ("ALL", "DEFAULT"))
    bf16 = "avx512_bf16" in flags and cap not in ("AVX512_CORE", "AVX512_CORE_VNNI")
    return avx512 and not bf16


def test_blocked_attention_result_does_not_depend_on_the_block_size(monkeypatch):
    """128-row blocks while the scores are small, 64 after: each query row's result is bit-identical, except
    where oneDNN emulates bf16 (then equal within bf16 rounding)."""
    from edgellm import model

    g = torch.Generator().manual_seed(5)
    q = torch.randn(1, 700, 9, 64, generator=g).transpose(1, 2).bfloat16()
    k, v = torch.randn(2, 1, 3, 720, 64, generator=g).bfloat16()
    mixed = model.blocked_causal_attention(q, k, v, 0)
    monkeypatch.setattr(model, "ATTN_SCORE_BYTES", 0)               # 64-row blocks only
    narrow = model.blocked_causal_attention(q, k, v, 0)
    if not onednn_emulates_bf16():
        assert torch.equal(narrow, mixed)
    else:
        torch.testing.assert_close(narrow.float(), mixed.float(), rtol=2 ** -7, atol=2 ** -9)
        assert (narrow != mixed).float().mean() < 0.05


def test_rope_tables_are_the_correctly_rounded_cos_and_sin() -> None:
    """Every load computes the same RoPE tables: cos/sin of the fp32 angles, correctly rounded to fp32 (torch's fp32
    cos gave the calling thread's half of the table ~6e-5 off in some processes, so two loads answered differently)."""
    import math

    from edgellm import model
    from edgellm.config import ModelConfig, rope_inv_freq

    cfg = ModelConfig(arch="llama", vocab_size=64, hidden_size=128, intermediate_size=64, num_layers=1, num_heads=4,
                      num_kv_heads=2, head_dim=32, max_seq_len=4096)
    tables = model.Transformer(cfg)
    tables.init_rope()
    inv = rope_inv_freq(cfg)
    for pos in (1, 7, 1000, 4095):
        angles = (torch.tensor(float(pos)) * inv).tolist()  # fp32 products, as the table's
        want_cos = torch.tensor([math.cos(a) for a in angles], dtype=torch.float64).float()
        want_sin = torch.tensor([math.sin(a) for a in angles], dtype=torch.float64).float()
        assert torch.equal(tables.rope_cos[pos, :16], want_cos) and torch.equal(tables.rope_cos[pos, 16:], want_cos)
        assert torch.equal(tables.rope_sin[pos, 16:], want_sin) and torch.equal(tables.rope_sin[pos, :16], -want_sin)
