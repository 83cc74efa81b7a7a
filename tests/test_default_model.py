"""The bundled SmolLM2-135M-Instruct GGUF against transformers' own GGUF loader (fp32)."""

from __future__ import annotations

import pytest
import torch

import edgellm

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # transformers needs it to load GGUF files

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "In 1492, Columbus sailed across the Atlantic and",
    "Photosynthesis converts light energy into",
    "<|im_start|>user\nWhat is 12 * 7?<|im_end|>\n<|im_start|>assistant\n",
    "Les chats sont des animaux très",
]


@pytest.fixture(scope="module")
def ours(default_gguf):
    return edgellm.load(default_gguf, dtype="fp32")


@pytest.fixture(scope="module")
def reference(default_gguf):
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(default_gguf.parent), gguf_file=default_gguf.name, dtype=torch.float32).eval()


@torch.no_grad()
@pytest.mark.parametrize("prompt", PROMPTS)
def test_logits_match_transformers(ours, reference, prompt):
    ids = ours.tokenizer.encode(prompt)
    got = ours.logits(ids)
    expected = reference(torch.tensor([ids])).logits[0]
    assert (got - expected).abs().max().item() <= 1e-3


@torch.no_grad()
def test_64_greedy_tokens_match_transformers(ours, reference):
    ids = ours.tokenizer.encode(PROMPTS[2])
    out = reference.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=64, min_new_tokens=64, do_sample=False, eos_token_id=None,
                             pad_token_id=2)
    expected = out[0, len(ids):].tolist()
    got = list(ours.generator.token_stream(ids, edgellm.SamplingParams(max_new_tokens=64, ignore_eos=True)))
    assert got == expected


def test_chat_knows_the_capital_of_france(ours):
    answer = ours.chat([{"role": "user", "content": "What is the capital of France?"}], max_new_tokens=32)
    assert "Paris" in answer
    assert ours.last_stats.finish_reason in ("eos", "length")


def test_bf16_is_close_to_fp32(ours, default_gguf):
    llm16 = edgellm.load(default_gguf, dtype="bf16")
    ids = ours.tokenizer.encode(PROMPTS[3])
    a, b = ours.logits(ids), llm16.logits(ids)
    # bf16 keeps the ranking: same top-1 at most positions and a small relative error
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.8
    assert ((a - b).norm() / a.norm()).item() < 0.05


@torch.no_grad()
def test_default_settings_follow_the_dequantized_model(default_gguf):
    """`--dtype auto` keeps the GGUF's Q4_1/Q8_0 blocks and decodes with int8 activations: its greedy answers to
    the demo prompts equal those of the same model with dequantized weights (same activation dtype), or first
    differ where the reference's top two logits are within 0.5 (a near-tie that rounding may flip)."""
    from edgellm.cli import DEMO_PROMPTS
    from edgellm.generate import SamplingParams
    from edgellm.kernels.blocklinear import BlockQLinear

    auto = edgellm.load(default_gguf)
    assert sum(isinstance(m, BlockQLinear) for m in auto.model.modules()) == 30 * 4 + 1
    ref = edgellm.load(default_gguf, dtype=auto.dtype)
    p = SamplingParams(max_new_tokens=40, ignore_eos=True)
    for prompt in DEMO_PROMPTS:
        ids = auto.chat_prompt_ids([{"role": "user", "content": prompt}])
        got = list(auto.generator.token_stream(ids, p))
        want = list(ref.generator.token_stream(ids, p))
        if got != want:
            i = next(i for i, (a, b) in enumerate(zip(got, want, strict=True)) if a != b)
            top2 = ref.logits(ids + want[:i])[-1].topk(2).values
            assert (top2[0] - top2[1]).item() <= 0.5, (prompt, i, auto.tokenizer.decode(got), top2)
