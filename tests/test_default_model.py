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
