"""Generation: greedy = argmax, sampling filters = transformers' logits processors, seeds, stop strings,
checkpoint EOS ids, batches of prompts, streaming, and validation of sampling values."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import edgellm
from edgellm import InvalidArgumentError, SamplingParams
from edgellm.generate import apply_repetition_penalty, filter_logits, sample_next

lp = pytest.importorskip("transformers.generation.logits_process")

PROMPT = "the quick brown fox"


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: 1 thread, restored after the module


@pytest.fixture(scope="module")
def llm(tiny_checkpoints: dict[str, Path]) -> edgellm.LLM:
    return edgellm.load(tiny_checkpoints["llama"], dtype="fp32")


def random_logits(seed: int, vocab: int = 512, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(vocab, generator=g) * scale


def hf_warp(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """transformers' warper chain, built as GenerationMixin._get_logits_processor builds it."""
    procs: list = [lp.TemperatureLogitsWarper(p.temperature)]
    if p.top_k:
        procs.append(lp.TopKLogitsWarper(top_k=p.top_k))
    if p.top_p < 1.0:
        procs.append(lp.TopPLogitsWarper(top_p=p.top_p))
    if p.min_p:
        procs.append(lp.MinPLogitsWarper(min_p=p.min_p))
    scores = logits[None].clone()
    ids = torch.zeros(1, 1, dtype=torch.long)
    for proc in procs:
        scores = proc(ids, scores)
    return scores[0]


# ---------------------------------------------------------------------------------------------- greedy
def test_greedy_sample_is_argmax() -> None:
    for seed in range(5):
        logits = random_logits(seed)
        assert sample_next(logits, SamplingParams(temperature=0.0), None) == int(logits.argmax())


def test_greedy_generation_equals_argmax_of_full_forward(llm: edgellm.LLM) -> None:
    """Cached decoding + greedy picks the argmax of an uncached full forward at every step."""
    ids = llm.tokenizer.encode(PROMPT)
    got = list(llm.generator.token_stream(ids, SamplingParams(max_new_tokens=12, ignore_eos=True)))
    seq = list(ids)
    for _ in range(12):
        seq.append(int(llm.logits(seq)[-1].argmax()))
    assert got == seq[len(ids):]
    assert llm.generate(PROMPT, max_new_tokens=12, ignore_eos=True) == llm.tokenizer.decode(
        got, skip_special_tokens=True)


# ---------------------------------------------------------------------------------------------- filters
WARPER_CASES = [
    dict(temperature=0.7),
    dict(temperature=1.0, top_k=1),
    dict(temperature=1.0, top_k=20),
    dict(temperature=1.3, top_k=200),
    dict(temperature=1.0, top_p=0.9),
    dict(temperature=0.5, top_p=0.5),
    dict(temperature=2.0, top_p=0.05),
    dict(temperature=1.0, min_p=0.05),
    dict(temperature=0.8, min_p=0.3),
    dict(temperature=0.9, top_k=40, top_p=0.8, min_p=0.02),
    dict(temperature=1.5, top_k=100, top_p=0.95, min_p=0.1),
]


@pytest.mark.parametrize("kwargs", WARPER_CASES, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()))
def test_filters_match_transformers_warpers(kwargs: dict) -> None:
    p = SamplingParams(**kwargs).validate()
    kept_counts = set()
    for seed in range(8):
        logits = random_logits(seed, scale=1.0 + seed)  # from flat to peaked distributions
        ours, ref = filter_logits(logits, p), hf_warp(logits, p)
        assert torch.equal(torch.isinf(ours), torch.isinf(ref)), (kwargs, seed)
        finite = ~torch.isinf(ref)
        assert torch.equal(ours[finite], ref[finite])
        kept_counts.add(int(finite.sum()))
    if any(k in kwargs for k in ("top_k", "top_p", "min_p")):
        assert min(kept_counts) < 512  # the filter did remove tokens in these cases


def test_filters_remove_what_they_should() -> None:
    logits = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0])
    assert torch.isinf(filter_logits(logits, SamplingParams(temperature=1, top_k=2))).tolist() == [
        False, False, True, True, True]
    probs = logits.softmax(-1)  # ~[0.64, 0.24, 0.09, 0.03, 0.01]
    assert probs[0] < 0.7 < probs[:2].sum()
    assert torch.isinf(filter_logits(logits, SamplingParams(temperature=1, top_p=0.7))).tolist() == [
        False, False, True, True, True]
    assert torch.isinf(filter_logits(logits, SamplingParams(temperature=1, min_p=0.2))).tolist() == [
        False, False, True, True, True]
    assert torch.isinf(filter_logits(logits, SamplingParams(temperature=1, top_p=0.01))).sum() == 4  # top stays


@pytest.mark.parametrize("penalty", [1.3, 0.7, 2.0])
def test_repetition_penalty_matches_transformers(penalty: float) -> None:
    for seed in range(4):
        logits = random_logits(seed)
        g = torch.Generator().manual_seed(100 + seed)
        seen = torch.randint(0, 512, (40,), generator=g)
        seen[5:10] = seen[0]  # repeated ids are penalised once, as in transformers
        ref = lp.RepetitionPenaltyLogitsProcessor(penalty)(seen[None], logits[None].clone())[0]
        ours = apply_repetition_penalty(logits, seen, penalty)
        assert torch.equal(ours, ref)
        assert not torch.equal(ours, logits)


def test_repetition_penalty_generation_matches_transformers_greedy(llm: edgellm.LLM) -> None:
    ids = llm.tokenizer.encode(PROMPT)
    proc = lp.RepetitionPenaltyLogitsProcessor(1.5)
    seq = list(ids)
    for _ in range(10):
        scores = proc(torch.tensor([seq]), llm.logits(seq)[-1:].clone())
        seq.append(int(scores[0].argmax()))
    p = SamplingParams(max_new_tokens=10, repetition_penalty=1.5, ignore_eos=True)
    assert list(llm.generator.token_stream(ids, p)) == seq[len(ids):]
    plain = list(llm.generator.token_stream(ids, SamplingParams(max_new_tokens=10, ignore_eos=True)))
    assert plain != seq[len(ids):]  # the penalty changed this greedy continuation


@pytest.mark.parametrize("kwargs", WARPER_CASES[:6] + WARPER_CASES[9:],
                         ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()))
def test_seeded_sample_equals_transformers_pipeline_draw(kwargs: dict) -> None:
    """Same filtered distribution and the same torch.Generator draw as transformers' sampling step."""
    p = SamplingParams(**kwargs).validate()
    for seed in range(6):
        logits = random_logits(seed, scale=2.0)
        ours = sample_next(logits, p, torch.Generator().manual_seed(seed))
        probs = hf_warp(logits, p).softmax(-1)
        ref = int(torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(seed)))
        assert ours == ref


# ---------------------------------------------------------------------------------------------- seeds
def test_same_seed_same_sample(llm: edgellm.LLM) -> None:
    kw = dict(max_new_tokens=16, temperature=1.2, top_k=100, seed=1234, ignore_eos=True)
    a = llm.generate(PROMPT, **kw)
    torch.manual_seed(999)  # the global RNG must not matter when a seed is given
    b = llm.generate(PROMPT, **kw)
    assert a == b
    others = {llm.generate(PROMPT, **{**kw, "seed": s}) for s in range(5)}
    assert len(others | {a}) > 1  # and the seed does change the sample


# ---------------------------------------------------------------------------------------------- stop strings
def _boundary_stop(llm: edgellm.LLM, ids: list[int], tokens: list[int]) -> tuple[str, str, int]:
    """A 4-char stop string that straddles a token boundary at its first occurrence in the greedy text."""
    full = llm.tokenizer.decode(tokens, skip_special_tokens=True)
    for k in range(2, len(tokens)):
        b = len(llm.tokenizer.decode(tokens[:k], skip_special_tokens=True))
        stop = full[b - 2:b + 2]
        if len(stop) == 4 and full.find(stop) == b - 2 and len(llm.tokenizer.decode(tokens[k:k + 1])) >= 2:
            return full, stop, b - 2
    raise AssertionError(f"no boundary-straddling stop string in {full!r}")


def test_stop_string_cuts_text_even_across_tokens(llm: edgellm.LLM) -> None:
    ids = llm.tokenizer.encode(PROMPT)
    tokens = list(llm.generator.token_stream(ids, SamplingParams(max_new_tokens=30, ignore_eos=True)))
    full, stop, cut = _boundary_stop(llm, ids, tokens)
    text = llm.generate(PROMPT, max_new_tokens=30, ignore_eos=True, stop=[stop])
    assert text == full[:cut]
    assert stop not in text
    assert llm.last_stats.finish_reason == "stop"
    assert llm.last_stats.new_tokens < 30
    pieces = list(llm.stream(PROMPT, max_new_tokens=30, ignore_eos=True, stop=stop))
    assert "".join(pieces) == full[:cut]
    # several stop strings: the earliest occurrence wins; a stop string that never occurs changes nothing
    assert llm.generate(PROMPT, max_new_tokens=30, ignore_eos=True, stop=["\x00never", stop]) == full[:cut]
    assert llm.generate(PROMPT, max_new_tokens=30, ignore_eos=True, stop="\x00never") == full
    assert llm.last_stats.finish_reason == "length"
    assert llm.generate(PROMPT, max_new_tokens=30, ignore_eos=True, stop=full[:3]) == ""


# ---------------------------------------------------------------------------------------------- EOS
def test_checkpoint_eos_ids_stop_generation(tiny_checkpoints: dict[str, Path], tmp_path: Path) -> None:
    folder = shutil.copytree(tiny_checkpoints["llama"], tmp_path / "m")
    base = edgellm.load(folder, dtype="fp32")
    ids = base.tokenizer.encode(PROMPT)
    tokens = list(base.generator.token_stream(ids, SamplingParams(max_new_tokens=20, ignore_eos=True)))
    k = next(i for i in range(1, len(tokens)) if tokens[i] not in tokens[:i])
    eos = tokens[k]
    assert eos not in base.tokenizer.eos_ids
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, eos]}))
    llm = edgellm.load(folder, dtype="fp32")
    assert eos in llm.tokenizer.eos_ids and 2 in llm.tokenizer.eos_ids
    text = llm.generate(PROMPT, max_new_tokens=20)
    assert text == base.tokenizer.decode(tokens[:k], skip_special_tokens=True)
    assert llm.last_stats.finish_reason == "eos"
    assert llm.last_stats.new_tokens == k
    assert llm.generate(PROMPT, max_new_tokens=20, ignore_eos=True) == base.generate(
        PROMPT, max_new_tokens=20, ignore_eos=True)


# ---------------------------------------------------------------------------------------------- batches, streams
def test_several_prompts_return_a_list(llm: edgellm.LLM) -> None:
    prompts = [PROMPT, "hello world", "the lazy dog"]
    out = llm.generate(prompts, max_new_tokens=6)
    assert isinstance(out, list) and len(out) == 3
    assert out == [llm.generate(p, max_new_tokens=6) for p in prompts]
    assert isinstance(llm.generate(PROMPT, max_new_tokens=2), str)
    ids = [llm.tokenizer.encode(p) for p in prompts]
    assert llm.generate(ids, max_new_tokens=6) == out  # lists of token-id lists too


@pytest.mark.parametrize("kwargs", [dict(), dict(temperature=0.9, top_p=0.9, seed=3),
                                    dict(temperature=1.0, seed=5, stop=["xyz", "o"])])
def test_stream_pieces_concatenate_to_generate(llm: edgellm.LLM, kwargs: dict) -> None:
    pieces = list(llm.stream(PROMPT, max_new_tokens=20, ignore_eos=True, **kwargs))
    text = llm.generate(PROMPT, max_new_tokens=20, ignore_eos=True, **kwargs)
    assert "".join(pieces) == text
    assert all(isinstance(p, str) and p for p in pieces)
    if not kwargs.get("stop"):
        assert len(pieces) > 1


def test_chat_equals_generation_from_the_templated_prompt(llm: edgellm.LLM) -> None:
    messages = [{"role": "user", "content": "hello there"}]
    ids = llm.chat_prompt_ids(messages)
    assert llm.tokenizer.decode(ids) == "<s>user: hello there</s><s>assistant:"
    assert llm.chat(messages, max_new_tokens=8) == llm.generate(ids, max_new_tokens=8)
    assert "".join(llm.stream_chat(messages, max_new_tokens=8)) == llm.chat(messages, max_new_tokens=8)


def test_stats_are_filled(llm: edgellm.LLM) -> None:
    llm.generate(PROMPT, max_new_tokens=7, ignore_eos=True)
    s = llm.last_stats
    assert s.prompt_tokens == len(llm.tokenizer.encode(PROMPT))
    assert s.new_tokens == 7 and s.finish_reason == "length"
    assert s.total_s > 0 and s.prefill_ms > 0 and s.time_per_token_ms > 0
    assert s.tokens_per_s == pytest.approx(1000 / s.time_per_token_ms)
    assert s.total_s * 1000 >= s.prefill_ms


# ---------------------------------------------------------------------------------------------- validation
BAD_SAMPLING = [
    dict(temperature=-0.1), dict(temperature=float("nan")), dict(temperature=float("inf")), dict(temperature="1"),
    dict(top_k=-1), dict(top_k=2.5), dict(top_p=0.0), dict(top_p=1.5), dict(top_p=float("nan")),
    dict(min_p=-0.1), dict(min_p=1.0), dict(repetition_penalty=0.0), dict(repetition_penalty=-1.0),
    dict(max_new_tokens=0), dict(max_new_tokens=-5), dict(max_new_tokens=2.0), dict(max_new_tokens=True),
    dict(seed="x"), dict(seed=1.5), dict(stop=[""]), dict(stop=[1]), dict(stop=5), dict(temprature=0.5),
]


@pytest.mark.parametrize("kwargs", BAD_SAMPLING, ids=repr)
def test_invalid_sampling_values_raise(llm: edgellm.LLM, kwargs: dict) -> None:
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(InvalidArgumentError, match="sampling"):
        llm.generate(PROMPT, **kwargs)
    with pytest.raises(InvalidArgumentError, match="sampling"):
        llm.stream(PROMPT, **kwargs)  # raised at the call, before the first piece is asked for
    with pytest.raises(InvalidArgumentError, match="sampling"):
        llm.stream_chat(messages, **kwargs)
    with pytest.raises(InvalidArgumentError, match="sampling"):
        llm.generate([PROMPT, "hello"], **kwargs)
    assert issubclass(InvalidArgumentError, ValueError)


@pytest.mark.parametrize("prompt", [3.5, None, {"a": 1}, [1, 2, 10_000], [-1], [True]], ids=repr)
def test_invalid_prompts_raise(llm: edgellm.LLM, prompt: object) -> None:
    with pytest.raises(InvalidArgumentError, match="prompt"):
        llm.generate(prompt)  # type: ignore[arg-type]


def test_invalid_messages_raise(llm: edgellm.LLM) -> None:
    for messages in ([], "hi", [{"content": "no role"}]):
        with pytest.raises(InvalidArgumentError, match="messages"):
            llm.chat(messages)  # type: ignore[arg-type]


def test_valid_edge_values_are_accepted(llm: edgellm.LLM) -> None:
    ok = dict(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0, max_new_tokens=1, seed=0)
    assert SamplingParams(**ok).validate().stop == ()
    assert SamplingParams(stop="x").validate().stop == ("x",)
    assert isinstance(llm.generate(PROMPT, max_new_tokens=1, top_k=10_000, temperature=1.0, seed=1), str)
