"""The decode/verify steps as one C call (native_step.py) against the eager model code, bit for bit, on tiny
block-quantized models of each attention variant (plain, sliding window with a rolling cache, q/k/v bias + tied
embeddings), in fp32 and bf16, Q4 and Q8 weights, batch 1 and 2."""

from __future__ import annotations

import pytest
import torch

from edgellm import native_step
from edgellm.config import ModelConfig
from edgellm.fast import CompiledDecoder
from edgellm.kernels import blockq
from edgellm.kernels.blocklinear import BlockQLinear, BlockWeight
from edgellm.model import Transformer
from edgellm.native_step import NativeStep

ARCHS = {
    "llama": {},
    "mistral": {"sliding_window": 16},
    "qwen2": {"attention_bias": True, "tie_word_embeddings": True},
}


def quantize(linear: torch.nn.Linear, bits: int) -> BlockQLinear:
    """RTN per block of 32 into the layout the loader packs for this CPU (Q4: w = d q + m; Q8: w = d q)."""
    w = linear.weight.float()
    n, k = w.shape
    blocks = w.reshape(n, k // blockq.QK, blockq.QK)
    if bits == 4:
        lo, hi = blocks.amin(-1), blocks.amax(-1)
        d = ((hi - lo) / 15).clamp_min(1e-8)
        q = torch.round((blocks - lo[..., None]) / d[..., None]).clamp(0, 15).reshape(n, k)
        qs, dm = blockq.pack_q4(blockq.ggml_nibbles(q), d, lo, blockq.load_lanes())
    else:
        d = (blocks.abs().amax(-1) / 127).clamp_min(1e-8)
        qs, dm = blockq.pack_q8(torch.round(blocks / d[..., None]).clamp(-127, 127), d, blockq.load_lanes())
    bias = None if linear.bias is None else linear.bias.detach().clone()
    return BlockQLinear(BlockWeight(bits, qs, dm, n, k), bias)


def tiny_block_model(arch: str, dtype: torch.dtype, bits: int, seed: int = 0) -> Transformer:
    cfg = ModelConfig(arch=arch, vocab_size=320, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=16, max_seq_len=128, **ARCHS[arch])
    torch.manual_seed(seed)
    model = Transformer(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.08 * torch.randn_like(p))
    model.tie_weights()
    model.init_rope()
    model = model.to(dtype).eval().requires_grad_(False)
    for layer in model.layers:
        for parent, name in ((layer.self_attn, "qkv_proj"), (layer.self_attn, "o_proj"), (layer.mlp, "gate_up_proj"),
                             (layer.mlp, "down_proj")):
            setattr(parent, name, quantize(getattr(parent, name), bits))
    # a float lm_head would round a T-row product unlike T one-row ones (MKL picks kernels by M); the shipped
    # model's is block-quantized too (a copy of the tied embedding here)
    model.lm_head = quantize(model.lm_head, 8)
    return model


@pytest.fixture(scope="module", autouse=True)
def needs_the_kernels() -> None:
    import os

    from edgellm.kernels import cpu, native

    if (native._compiler() is None or not cpu.has("avx2") or os.environ.get("EDGELLM_NATIVE", "1") == "0"
            or os.environ.get("EDGELLM_NATIVE_STEP", "1") == "0"):
        pytest.skip("no C compiler, no AVX2, or EDGELLM_NATIVE(_STEP)=0: steps run eagerly or compiled")
    # every kernel it calls builds for the x86-64-v3 baseline: where a compiler is, a failure must fail here
    assert native_step._library() is not None, native_step.unsupported(tiny_block_model("llama", torch.float32, 4))


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("arch", list(ARCHS))
@torch.inference_mode()
def test_steps_equal_the_eager_model_bit_for_bit(arch, dtype, bits, batch) -> None:
    model = tiny_block_model(arch, dtype, bits)
    step = NativeStep(model)
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(3, 320, (batch, 40), generator=g)
    new = torch.randint(3, 320, (batch, 6), generator=g)
    results = {}
    for kind in ("eager", "native"):
        model.setup_cache(batch, 64, slack=16)  # mistral: a rolling cache (window 16 + 16 spare slots < 64)
        model(prompt, 0, use_cache=True)
        decode = model.decode_step if kind == "eager" else step.step
        steps = torch.stack([decode(new[:, i:i + 1], torch.tensor([40 + i])) for i in range(4)], dim=1)
        verify = model.verify_step if kind == "eager" else step.verify
        verified = verify(new[:, 4:], torch.tensor([44, 45]))  # after the steps: a verify over written slots
        results[kind] = steps, verified
    assert model.layers[0].self_attn.cache.rolling == (arch == "mistral")
    for got, want in zip(results["native"], results["eager"], strict=True):
        assert got.dtype == torch.float32 and got.shape == want.shape
        assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.inference_mode()
def test_a_verify_equals_its_steps_and_overwrites_rolled_back_drafts(dtype) -> None:
    model = tiny_block_model("mistral", dtype, 4)
    step = NativeStep(model)
    prompt = torch.randint(3, 320, (1, 30), generator=torch.Generator().manual_seed(2))
    drafts = torch.tensor([[11, 12, 13, 14, 15]])
    model.setup_cache(1, 64, slack=16)
    model(prompt, 0, use_cache=True)
    step.verify(torch.tensor([[99, 98, 97, 96, 95]]), torch.arange(30, 35))  # rejected drafts: written, rolled back
    verified = step.verify(drafts, torch.arange(30, 35))[0]
    model.setup_cache(1, 64, slack=16)
    model(prompt, 0, use_cache=True)
    steps = torch.stack([step.step(drafts[:, i:i + 1], torch.tensor([30 + i]))[0] for i in range(5)])
    assert torch.equal(verified, steps)


@torch.inference_mode()
def test_long_inputs_and_other_caches_take_the_eager_path() -> None:
    model = tiny_block_model("llama", torch.float32, 4)
    step = NativeStep(model)
    model.setup_cache(1, 64)
    model(torch.randint(3, 320, (1, 8)), 0, use_cache=True)
    long = torch.randint(3, 320, (1, BlockQLinear.DENSE_FROM_ROWS))  # eager would take the dense products
    assert step._hidden(long, torch.arange(8, 8 + long.shape[1])) is None
    torch.testing.assert_close(step.verify(long, torch.arange(8, 8 + long.shape[1])),
                               model.verify_step(long, torch.arange(8, 8 + long.shape[1])), rtol=0, atol=0)
    model.setup_cache(1, 64, dtype=torch.bfloat16)  # a cache in another dtype: no cache kernel, no C step
    assert step._hidden(torch.tensor([[5]]), torch.tensor([0])) is None


def test_models_it_cannot_run_say_why(monkeypatch) -> None:
    model = tiny_block_model("llama", torch.float32, 4)
    assert native_step.unsupported(model) is None
    model.layers[1].mlp.down_proj = torch.nn.Linear(128, 64, bias=False)
    assert "Linear layers" in native_step.unsupported(model)
    with pytest.raises(ValueError, match="Linear layers"):
        NativeStep(model)
    assert "float16" in native_step.unsupported(tiny_block_model("llama", torch.float16, 4))
    monkeypatch.setenv("EDGELLM_NATIVE_STEP", "0")
    assert native_step.unsupported(tiny_block_model("llama", torch.float32, 4)) == "EDGELLM_NATIVE_STEP=0"


@torch.inference_mode()
def test_the_compiled_decoder_runs_block_models_in_c_without_inductor() -> None:
    model = tiny_block_model("qwen2", torch.bfloat16, 4)
    fast = CompiledDecoder(model)
    assert fast.native is not None and fast.enabled and fast.exact and "C" in fast.note
    ids = torch.randint(3, 320, (1, 12), generator=torch.Generator().manual_seed(3))
    logits = []
    for decode in (model.decode_step, fast.step):
        model.setup_cache(1, 64)
        model(ids, 0, use_cache=True)
        logits.append(decode(torch.tensor([[7]]), torch.tensor([12])))
    assert torch.equal(*logits)
    assert not fast._fns  # nothing traced


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("arch", ["llama", "mistral"])
@torch.inference_mode()
def test_batched_rows_equal_the_eager_batch_step_and_each_sequence_alone(arch, dtype) -> None:
    """Continuous batching: sequences in rows of a pooled cache, each at its own position (Mistral: its window)."""
    from edgellm.model import KVCache

    model = tiny_block_model(arch, dtype, 4)
    step = NativeStep(model)
    cfg = model.config
    g = torch.Generator().manual_seed(4)
    prompts = {0: 30, 2: 9, 3: 21}  # cache row -> prompt length
    results = {}
    for kind in ("eager", "native", "alone"):
        pool = [KVCache(4, cfg.num_kv_heads, 64, cfg.head_dim, dtype, rolling=False) for _ in model.layers]
        for row, n in prompts.items():
            model.use_caches([c.row(row) for c in pool])
            model(torch.randint(3, 320, (1, n), generator=torch.Generator().manual_seed(row)), 0, use_cache=True)
        model.use_caches(pool)
        tokens = torch.randint(3, 320, (3, 1), generator=g)
        rows, pos = list(prompts), list(prompts.values())
        if kind == "alone":
            results[kind] = torch.cat([step.batch_step(tokens[i:i + 1], rows[i:i + 1], pos[i:i + 1])
                                       for i in range(3)])
        else:
            batch = model.batch_decode_step if kind == "eager" else step.batch_step
            results[kind] = batch(tokens, rows, pos)
        g.manual_seed(4)
    assert torch.equal(results["native"], results["eager"])
    assert torch.equal(results["alone"], results["native"])


@torch.inference_mode()
def test_default_model_steps_equal_eager_and_greedy_text_is_unchanged(default_gguf) -> None:
    """The shipped model with default settings: the generator's fast path is the C step, and its greedy tokens and
    logits equal the eager model's bit for bit (so the demo's text is eager's text)."""
    import edgellm

    llm = edgellm.load(default_gguf, compile=True)
    fast = llm.generator.compiled
    assert fast.native is not None and not fast._fns
    m = llm.model
    ids = llm.tokenizer.encode_chat([{"role": "user", "content": "What does Xilinx do?"}])
    runs = []
    for decode in (m.decode_step, fast.step):
        m.setup_cache(1, 256)
        logits = m(torch.tensor([ids]), 0, use_cache=True, last_only=True)[0, -1].float()
        out = []
        for i in range(24):
            out.append(logits)
            logits = decode(torch.tensor([[int(logits.argmax())]]), torch.tensor([len(ids) + i]))[0]
        runs.append(torch.stack(out))
    assert torch.equal(runs[0], runs[1])
    eager = edgellm.load(default_gguf, compile=False)
    assert eager.generator.compiled is None
    assert llm.generate("What does Xilinx do?", max_new_tokens=24) == eager.generate("What does Xilinx do?",
                                                                                     max_new_tokens=24)
    # the API's default (compile=None) takes the C step where nothing needs compiling
    assert edgellm.load(default_gguf).generator.compiled.native is not None


def test_api_default_compiles_nothing(tiny_checkpoints) -> None:
    """compile=None (edgellm.load's default): a float model decodes eagerly, nothing traced or compiled."""
    import edgellm

    assert edgellm.load(tiny_checkpoints["llama"], dtype="fp32").generator.compiled is None
    assert edgellm.load(tiny_checkpoints["llama"], dtype="fp32", compile=True).generator.compiled is not None
