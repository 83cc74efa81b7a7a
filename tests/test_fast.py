"""The static-shape decode step (the function the fast path compiles) against the eager cached forward."""

from __future__ import annotations

import pytest
import torch

import edgellm
from edgellm.fast import CompiledDecoder, bucket, compiler_available
from tests.conftest import TINY_CONFIGS

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: 1 thread, restored after the module


def decode_both(llm, ids: list[int], steps: int, cache_len: int, step_fn=None):
    """Feed the same tokens through forward(use_cache) and decode_step; return both logit sequences."""
    model = llm.model
    step_fn = step_fn or model.decode_step
    out = {}
    for mode in ("forward", "step"):
        model.setup_cache(1, cache_len)
        logits = [model(torch.tensor([ids[:8]]), 0, use_cache=True)[0, -1].float()]
        for t in range(8, 8 + steps):
            tok = torch.tensor([[ids[t]]])
            if mode == "forward":
                logits.append(model(tok, t, use_cache=True)[0, -1].float())
            else:
                logits.append(step_fn(tok, torch.tensor([t]))[0])
        out[mode] = torch.stack(logits)
    return out["forward"], out["step"]


@torch.inference_mode()
@pytest.mark.parametrize("name", list(TINY_CONFIGS))
def test_decode_step_matches_forward(tiny_checkpoints, name):
    llm = edgellm.load(tiny_checkpoints[name], dtype="fp32")
    ids = torch.randint(3, 320, (80,), generator=torch.Generator().manual_seed(0)).tolist()
    # a cache bigger than needed (as the bucketed fast path allocates) must not change anything
    ref, got = decode_both(llm, ids, 70, cache_len=128)
    assert (ref - got).abs().max().item() <= 1e-4, name


def test_prune_steps_deletes_only_long_unused(tmp_path, monkeypatch):
    import os
    import time

    from edgellm.fast import prune_steps, steps_dir

    monkeypatch.setenv("EDGELLM_CACHE", str(tmp_path))
    steps_dir().mkdir(parents=True)
    old, recent, other = (steps_dir() / n for n in ("decode-old.bin", "decode-recent.bin", "simd-probe-ok"))
    for f in (old, recent, other):
        f.write_bytes(b"x")
    long_ago = time.time() - 40 * 86400
    os.utime(old, (long_ago, long_ago))
    os.utime(other, (long_ago, long_ago))
    prune_steps(30)
    assert not old.exists() and recent.exists() and other.exists()


def test_bucket_sizes():
    assert bucket(1) == 256 and bucket(256) == 256 and bucket(257) == 512 and bucket(513) == 768


@pytest.mark.skipif(compiler_available() is not None, reason="no C++ compiler for torch.compile")
@torch.inference_mode()
def test_compiled_step_matches_eager(tiny_checkpoints, tmp_path, monkeypatch, capsys):
    from edgellm.fast import _isa_marker, _machine_id

    monkeypatch.setenv("EDGELLM_CACHE", str(tmp_path))
    _isa_marker().parent.mkdir(parents=True)
    _isa_marker().write_text("written for another CPU or torch")  # not trusted: inductor probes, then rewritten
    llm = edgellm.load(tiny_checkpoints["mistral"], dtype="fp32")  # rolling cache + window mask
    fast = CompiledDecoder(llm.model)
    assert fast.enabled
    ids = torch.randint(3, 320, (48,), generator=torch.Generator().manual_seed(1)).tolist()
    ref, got = decode_both(llm, ids, 40, cache_len=64, step_fn=fast.step)
    assert (ref - got).abs().max().item() <= 1e-4
    assert fast.compile_s > 0 and fast.note == ""  # the AOT path, not the torch.compile fallback
    assert "edgellm: compiling the decode step for a 16-token cache (once per machine" in capsys.readouterr().err
    assert _isa_marker().read_text() == _machine_id()
    assert len(list((tmp_path / "steps").glob("decode-*.bin"))) == 1

    # A second model (as in a new process) loads the saved step instead of compiling: compiling is disabled.
    # Its weights differ (same shapes): the saved step must read them, not constants baked in at compile time.
    again = edgellm.load(tiny_checkpoints["mistral"], dtype="fp32")
    again.model.norm.weight.mul_(1.5)
    again.model.layers[0].mlp.down_proj.weight.mul_(-1.0)
    fast2 = CompiledDecoder(again.model)

    def no_compile(*args, **kwargs):
        raise AssertionError("compiled again instead of loading the saved step")

    monkeypatch.setattr(torch, "compile", no_compile)
    ref2, got2 = decode_both(again, ids, 40, cache_len=64, step_fn=fast2.step)
    assert fast2.note == "" and "compiling" not in capsys.readouterr().err
    assert (ref2 - got2).abs().max().item() <= 1e-4 and (ref2 - ref).abs().max().item() > 1e-2


@pytest.mark.skipif(compiler_available() is not None, reason="no C++ compiler for torch.compile")
@torch.inference_mode()
def test_failed_aot_compile_falls_back_to_torch_compile(tiny_checkpoints, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGELLM_CACHE", str(tmp_path))
    llm = edgellm.load(tiny_checkpoints["llama"], dtype="fp32")
    fast = CompiledDecoder(llm.model)

    def broken(*args, **kwargs):
        raise RuntimeError("aot_compile unsupported here")

    monkeypatch.setattr(fast, "_load_or_compile", broken)
    ids = torch.randint(3, 320, (24,), generator=torch.Generator().manual_seed(2)).tolist()
    ref, got = decode_both(llm, ids, 12, cache_len=32, step_fn=fast.step)
    assert (ref - got).abs().max().item() <= 1e-4
    assert fast.enabled and "AOT-compiled step unavailable (RuntimeError)" in fast.note


def test_step_fingerprint_pins_shapes_and_weights(tiny_checkpoints):
    from edgellm.fast import step_fingerprint
    from edgellm.quant import quantize_llm

    a = edgellm.load(tiny_checkpoints["llama"], dtype="bf16")
    b = edgellm.load(tiny_checkpoints["llama"], dtype="bf16")
    for m in (a.model, b.model):
        m.setup_cache(1, 256)
    key = (1, 256, torch.bfloat16)
    assert step_fingerprint(a.model, key) == step_fingerprint(b.model, key)  # same checkpoint, same file
    assert step_fingerprint(a.model, key) != step_fingerprint(a.model, (1, 512, torch.bfloat16))
    b.model.setup_cache(1, 512)
    assert step_fingerprint(a.model, key) != step_fingerprint(b.model, key)  # cache buffers differ
    b.model.setup_cache(1, 256)
    b.model.init_rope(a.model.rope_cos.shape[0] * 2)  # longer RoPE tables: the traced index_select differs
    assert step_fingerprint(a.model, key) != step_fingerprint(b.model, key)
    b.model.init_rope(a.model.rope_cos.shape[0])
    assert step_fingerprint(a.model, key) == step_fingerprint(b.model, key)
    quantize_llm(b, "rtn:w4:g32")
    assert step_fingerprint(a.model, key) != step_fingerprint(b.model, key)


def test_generator_uses_bucketed_cache(tiny_checkpoints):
    llm = edgellm.load(tiny_checkpoints["llama"], dtype="fp32")
    llm.generator.compiled = CompiledDecoder.__new__(CompiledDecoder)  # eager stand-in: same code path
    llm.generator.compiled.model, llm.generator.compiled.enabled = llm.model, False
    llm.generator.compiled.compile_s, llm.generator.compiled.note = 0.0, ""
    text = llm.generate("hello world", max_new_tokens=8, ignore_eos=True)
    assert llm.model.layers[0].self_attn.cache.k.shape[2] == 256  # a bucket of the 256-token context
    eager = edgellm.load(tiny_checkpoints["llama"], dtype="fp32")
    assert text == eager.generate("hello world", max_new_tokens=8, ignore_eos=True)


def greedy_with_gaps(llm, ids: list[int], n: int, step) -> tuple[list[int], list[float]]:
    """Greedy tokens and, per step, the gap between the top-two logits."""
    model = llm.model
    model.setup_cache(1, bucket(len(ids) + n))
    logits = model(torch.tensor([ids]), 0, use_cache=True, last_only=True)[0, -1].float()
    tokens, gaps = [], []
    for i in range(n):
        top = logits.topk(2).values
        gaps.append(float(top[0] - top[1]))
        tokens.append(int(logits.argmax()))
        logits = step(torch.tensor([[tokens[-1]]]), torch.tensor([len(ids) + i]))
    return tokens, gaps


@pytest.mark.skipif(compiler_available() is not None, reason="no C++ compiler for torch.compile")
@torch.inference_mode()
def test_fast_path_greedy_equals_eager_on_demo_prompts(default_gguf):
    """128 greedy tokens per demo prompt (bf16): identical, or the first difference is a near-tie
    (top-two logits within 0.5 in the eager run), which bf16 rounding may legitimately flip."""
    from edgellm.cli import DEMO_PROMPTS

    torch.set_num_threads(2)
    llm = edgellm.load(default_gguf, dtype="bf16")
    fast = CompiledDecoder(llm.model)
    model = llm.model

    def eager(tok, pos):
        return model(tok, int(pos), use_cache=True)[0, -1].float()

    for prompt in DEMO_PROMPTS:
        ids = llm.tokenizer.encode_chat([{"role": "user", "content": prompt}])
        ref, gaps = greedy_with_gaps(llm, ids, 128, eager)
        got, _ = greedy_with_gaps(llm, ids, 128, lambda t, p: fast.step(t, p)[0])
        first = next((i for i in range(128) if ref[i] != got[i]), None)
        assert first is None or gaps[first] <= 0.5, (prompt, first, gaps[first])
