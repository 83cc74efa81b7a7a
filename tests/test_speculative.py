"""Speculative decoding: greedy output identical to plain decoding for every method on every architecture and on
the default model, the sampled output's distribution equal to plain sampling (chi-square, and a wrong rule
fails it), KV-cache rollback, statistics and argument errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import edgellm
from edgellm import InvalidArgumentError, SamplingParams
from edgellm import speculative as spec
from tests.conftest import TINY_CONFIGS, make_hf_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

# a prompt that repeats itself, so prompt lookup finds n-grams (on random weights most drafts still fail:
# rollbacks are exercised on every architecture)
PROMPT = "the quick brown fox jumps over the lazy dog. the quick brown fox jumps over the lazy dog. the quick"
DEMO_PROMPTS = ["What is the meaning of life?", "Tell me something you don't know.", "What does Xilinx do?"]


@pytest.fixture(scope="module")
def draft_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """A second random model per architecture (other weights, the same tokenizer): the `draft` method."""
    root = tmp_path_factory.mktemp("drafts")
    return {name: make_hf_checkpoint(name, root / name, seed=100 + i) for i, name in enumerate(TINY_CONFIGS)}


def greedy(llm: edgellm.LLM, prompt: str, n: int = 128) -> list[int]:
    ids = llm.tokenizer.encode(prompt)
    return list(llm.generator.token_stream(ids, SamplingParams(max_new_tokens=n, ignore_eos=True)))


@pytest.mark.parametrize("name", list(TINY_CONFIGS))
def test_greedy_identity_every_method_every_architecture(tiny_checkpoints, draft_checkpoints, name) -> None:
    ckpt = tiny_checkpoints[name]
    plain = greedy(edgellm.load(ckpt, dtype="fp32"), PROMPT)
    runs = {
        "lookup": edgellm.load(ckpt, dtype="fp32", speculative="lookup"),
        "lookup k=16": edgellm.load(ckpt, dtype="fp32", speculative="lookup", draft_k=16),
        "self": edgellm.load(ckpt, dtype="fp32", speculative="self"),
        "draft": edgellm.load(ckpt, dtype="fp32", speculative="draft", draft_model=draft_checkpoints[name]),
    }
    for label, llm in runs.items():
        got = greedy(llm, PROMPT)
        s = llm.last_stats
        assert got == plain, f"{name} {label}: differs from plain greedy decoding"
        assert s.new_tokens == 128 and s.speculative == label.split()[0]
        assert s.rounds > 0 and 0 <= s.accepted <= s.drafted
    # the 4-bit copy of the same weights agrees with its target far more often than a random other model
    assert runs["self"].last_stats.acceptance_rate > runs["draft"].last_stats.acceptance_rate


def test_rolling_cache_rollback_keeps_window(tiny_checkpoints) -> None:
    """Mistral (sliding window 16): long drafts roll back across the window edge many times."""
    ckpt = tiny_checkpoints["mistral"]
    prompt = PROMPT * 2  # longer than the window
    plain = greedy(edgellm.load(ckpt, dtype="fp32"), prompt, 100)
    llm = edgellm.load(ckpt, dtype="fp32", speculative="self", draft_k=16)
    assert greedy(llm, prompt, 100) == plain
    cache = llm.model.layers[0].self_attn.cache
    assert cache.rolling and cache.size == llm.config.sliding_window + spec.K_MAX


def test_lookup_drafts_what_followed_the_longest_match() -> None:
    d = spec.LookupDrafter()
    sp = SamplingParams()
    ctx = [1, 2, 3, 9, 1, 2, 3, 7, 8, 5, 1, 2, 3]
    assert d.propose(ctx, 2, sp, None) == ([7, 8], None)    # [1 2 3] twice before: the latest one
    assert d.propose([4, 5, 6, 4, 5], 3, sp, None) == ([6], None)  # a two-token match drafts one token
    # the longest match wins over the latest: [5 1 2 3] matched 4 tokens -> up to 3 drafted
    assert d.propose([5, 1, 2, 3, 8, 7, 2, 3, 9, 0, 5, 1, 2, 3], 3, sp, None) == ([8, 7, 2], None)
    assert d.propose([5, 1, 2, 3, 8, 7, 2, 3, 9, 0, 5, 1, 2, 3], 9, sp, None) == ([8, 7, 2], None)
    assert d.propose([1, 2, 3], 4, sp, None) == ([], None)  # nothing repeats
    assert d.propose([1, 2, 3, 9, 3], 4, sp, None) == ([], None)  # a lone repeated token: no draft


def test_lookup_index_equals_a_scan_of_the_growing_context() -> None:
    """The drafter's pair index (grown as the context is appended to) drafts what a scan of the whole context
    drafts: the continuation of the longest earlier match of the tail (compared over at most K + 1 tokens, among the
    latest LOOKUP_CANDIDATES occurrences of the last two tokens; the latest on ties), at most match - 1 tokens."""
    def scan(context: list[int], k: int) -> list[int]:
        L = len(context)
        ends = [e for e in range(2, L) if context[e - 2:e] == context[-2:]][-spec.LOOKUP_CANDIDATES:]
        best, best_end = 0, -1
        for e in ends:  # oldest first: a later end with as long a match replaces it
            n = max(n for n in range(2, min(e, k + 1) + 1) if context[e - n:e] == context[L - n:])
            if n >= best:
                best, best_end = n, e
        return context[best_end:best_end + min(k, best - 1)] if best else []

    g = torch.Generator().manual_seed(0)
    d = spec.LookupDrafter()
    d.start([], 0, 0)
    context: list[int] = []
    drafted = long = 0
    for _ in range(1500):
        context += torch.randint(0, 4, (int(torch.randint(1, 4, (), generator=g)),), generator=g).tolist()
        k = int(torch.randint(1, 9, (), generator=g))
        got = d.propose(context, k, SamplingParams(), None)[0]
        assert got == scan(context, k), len(context)
        drafted += bool(got)
        long += len(got) > 2
    assert drafted > 1000 and long > 100
    assert len(context) > 64 * 16 * 2  # more occurrences of a pair than are compared
    assert d.propose(context[:50], 5, SamplingParams(), None)[0] == scan(context[:50], 5)  # another list: re-indexed


def test_stats_and_errors(tiny_checkpoints) -> None:
    ckpt = tiny_checkpoints["llama"]
    llm = edgellm.load(ckpt, dtype="fp32", speculative="self", draft_k=4)
    llm.generate(PROMPT, max_new_tokens=40, ignore_eos=True)
    s = llm.last_stats.to_dict()
    assert s["speculative"] == "self" and s["drafted"] > 0
    assert s["acceptance_rate"] == pytest.approx(s["accepted"] / s["drafted"])
    assert s["mean_accepted"] == pytest.approx(s["accepted"] / s["rounds"])
    assert s["drafted"] <= 4 * s["rounds"]
    assert edgellm.load(ckpt, speculative="self").dtype == torch.float32  # dtype auto: a full-precision target
    with pytest.raises(InvalidArgumentError, match="unknown speculative method"):
        edgellm.load(ckpt, dtype="fp32", speculative="medusa")
    with pytest.raises(InvalidArgumentError, match="draft length K"):
        edgellm.load(ckpt, dtype="fp32", speculative="lookup", draft_k=0)
    with pytest.raises(InvalidArgumentError, match="needs a draft model"):
        edgellm.load(ckpt, dtype="fp32", speculative="draft")
    with pytest.raises(InvalidArgumentError, match="need speculative="):
        edgellm.load(ckpt, dtype="fp32", draft_k=3)


def test_draft_model_must_share_the_vocabulary(tiny_checkpoints, tmp_path) -> None:
    other = make_hf_checkpoint("llama", tmp_path / "other", seed=7)
    tok = json.loads((other / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = sorted(vocab)[10:12]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # same size, two ids swapped
    (other / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(InvalidArgumentError, match="does not share the target's vocabulary"):
        edgellm.load(tiny_checkpoints["llama"], dtype="fp32", speculative="draft", draft_model=other)


def test_self_speculation_needs_a_higher_precision_target(default_gguf) -> None:
    loaded = edgellm.load(default_gguf).loaded  # dtype auto: the GGUF's Q4 blocks
    with pytest.raises(InvalidArgumentError, match="already runs low-bit weights"):
        spec.build_speculator("self", loaded)


# ---------------------------------------------------------------------------------------------- default model
@pytest.fixture(scope="module")
def default_plain(default_gguf) -> dict[str, list[int]]:
    llm = edgellm.load(default_gguf)
    return {p: greedy_chat(llm, p) for p in DEMO_PROMPTS}


def greedy_chat(llm: edgellm.LLM, prompt: str) -> list[int]:
    ids = llm.chat_prompt_ids([{"role": "user", "content": prompt}])
    return list(llm.generator.token_stream(ids, SamplingParams(max_new_tokens=128)))


def test_default_model_lookup_equals_plain_greedy(default_gguf, default_plain) -> None:
    """The shipped Q4_1 weights with `--dtype auto` activations (bf16 or fp32 by CPU), eager: identical ids."""
    llm = edgellm.load(default_gguf, speculative="lookup")
    for prompt, want in default_plain.items():
        assert greedy_chat(llm, prompt) == want, prompt


def test_default_model_compiled_lookup_equals_plain_greedy(default_gguf) -> None:
    """Compiled, default settings (what the CLI runs): the verify step (padded to a compiled size) against plain
    compiled decoding. With attention in the C kernel (kernels/cache_attention.py) the plain step rounds bf16 as
    eager PyTorch does at no cost, so speculation reuses it and a verified row equals a step bit for bit. (Eager
    decoding may part from both at a rounding tie: its RMSNorm/SiLU run in csrc/pointwise.c.)"""
    from edgellm.kernels import cache_attention

    llm = edgellm.load(default_gguf, speculative="lookup", compile=True)
    if llm.generator.verifier is None:
        pytest.skip(f"no compiled steps here: {llm.generator.note}")
    plain = edgellm.load(default_gguf, compile=True)
    assert plain.generator.compiled.exact == (cache_attention.available() and plain.model.dtype == torch.bfloat16)
    assert llm.generator.verifier is llm.generator.compiled or not cache_attention.available()
    for prompt in DEMO_PROMPTS[:2]:
        assert greedy_chat(llm, prompt) == greedy_chat(plain, prompt), prompt
        assert llm.last_stats.rounds > 0


def test_default_model_self_speculation_equals_fp32_plain_greedy(default_gguf) -> None:
    """The issue's case: the GGUF's Q4 blocks draft for the fp32 dequantized model. (A dense bf16 target would
    not be bit-exact: oneDNN's bf16 GEMM accumulates a 1-row and a K-row product in different orders.)"""
    plain = edgellm.load(default_gguf, dtype="fp32")
    llm = edgellm.load(default_gguf, dtype="fp32", speculative="self")
    prompt = DEMO_PROMPTS[2]
    assert greedy_chat(llm, prompt) == greedy_chat(plain, prompt)
    assert llm.last_stats.acceptance_rate > 0.5


# ---------------------------------------------------------------------------------------------- distribution
def chi_square_p(observed: torch.Tensor, expected: torch.Tensor) -> float:
    """Pearson's goodness-of-fit p-value; cells expecting < 5 are pooled into one."""
    small = expected < 5
    obs = torch.cat([observed[~small], observed[small].sum()[None]]).double()
    exp = torch.cat([expected[~small], expected[small].sum()[None]]).double()
    keep = exp > 0
    stat = ((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum()
    df = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), stat / 2))


class TableModel:
    """A real tiny model's next-token logits, memoised per context (the test reaches a few dozen contexts)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.table: dict[tuple[int, ...], torch.Tensor] = {}

    def __call__(self, ctx: list[int]) -> torch.Tensor:
        key = tuple(ctx)
        if key not in self.table:
            with torch.inference_mode():
                self.table[key] = self.model(torch.tensor([ctx]))[0, -1].float()
        return self.table[key]


def speculative_samples(target: TableModel, draft: TableModel, prompt: list[int], p: SamplingParams, n: int,
                        k: int, seed: int) -> torch.Tensor:
    """n three-token continuations sampled with `spec.verify` exactly as the decoding loop calls it: the drafter
    samples K tokens from its processed distribution, the target checks them at once."""
    gen = torch.Generator().manual_seed(seed)
    out = torch.empty(n, 3, dtype=torch.long)
    for s in range(n):
        ctx = list(prompt)
        emit, _ = spec.verify(target(ctx)[None], [], None, ctx, p, gen)
        ctx += emit
        while len(ctx) - len(prompt) < 3:
            kk = min(k, 3 - (len(ctx) - len(prompt)) - 1)
            drafts, qs = [], []
            for _ in range(kk):
                q = spec.filter_logits(draft(ctx + drafts), p).softmax(-1)
                drafts.append(int(torch.multinomial(q, 1, generator=gen)))
                qs.append(q)
            logits = torch.stack([target(ctx + drafts[:i]) for i in range(kk + 1)])
            emit, _ = spec.verify(logits, drafts, torch.stack(qs) if qs else None, ctx, p, gen)
            ctx += emit
        out[s] = torch.tensor(ctx[len(prompt):len(prompt) + 3])
    return out


def test_sampling_keeps_the_target_distribution(tiny_checkpoints, draft_checkpoints, monkeypatch) -> None:
    """20,000 speculative samples of the first three tokens (target and draft: two random tiny models, top-k 4
    so 64 outcomes) against the exact joint distribution of plain sampling, and a plain-sampling run through
    the same test; a wrong rule (resampling from p instead of norm(max(0, p - q))) must fail it."""
    target_llm = edgellm.load(tiny_checkpoints["llama"], dtype="fp32")
    draft_llm = edgellm.load(draft_checkpoints["llama"], dtype="fp32")
    prompt = target_llm.tokenizer.encode("the quick brown")
    p = SamplingParams(temperature=1.3, top_k=4).validate()
    target, draft = TableModel(target_llm.model), TableModel(draft_llm.model)

    def support(ctx):
        probs = spec.filter_logits(target(ctx), p).softmax(-1)
        return [(t, float(probs[t])) for t in torch.nonzero(probs).flatten().tolist()]

    exact = {(a, b, c): pa * pb * pc for a, pa in support(prompt) for b, pb in support(prompt + [a])
             for c, pc in support(prompt + [a, b])}                  # plain sampling's joint distribution
    keys = sorted(exact)
    expected = torch.tensor([exact[k] for k in keys], dtype=torch.float64)
    assert len(keys) == 64 and abs(float(expected.sum()) - 1) < 1e-5

    def counts(samples):
        index = {k: i for i, k in enumerate(keys)}
        flat = torch.tensor([index[tuple(row.tolist())] for row in samples])
        return torch.bincount(flat, minlength=len(keys)).double()

    n = 20_000
    plain = speculative_samples(target, draft, prompt, p, n, k=0, seed=1)  # K = 0: plain sampling
    assert chi_square_p(counts(plain), expected * n) > 0.01
    good = speculative_samples(target, draft, prompt, p, n, k=2, seed=0)
    assert chi_square_p(counts(good), expected * n) > 0.01
    monkeypatch.setattr(spec, "residual", lambda probs, q, d: probs)  # the classic mistake
    bad = speculative_samples(target, draft, prompt, p, n, k=2, seed=0)
    assert chi_square_p(counts(bad), expected * n) < 1e-6


def test_real_model_sampling_matches_plain_sampling(tiny_checkpoints) -> None:
    """The whole loop with a real drafter and KV rollbacks: 3,000 seeded speculative runs of three tokens (so one
    draft round follows the first token) vs plain sampling's exact joint distribution (top-k 3: 27 outcomes)."""
    ckpt = tiny_checkpoints["qwen2"]
    llm = edgellm.load(ckpt, dtype="fp32", speculative="self", draft_k=3)
    ids = llm.tokenizer.encode("hello world")
    p = SamplingParams(temperature=1.0, top_k=3, max_new_tokens=3, ignore_eos=True)
    target = TableModel(llm.model)

    def support(ctx):
        probs = spec.filter_logits(target(ctx), p).softmax(-1)
        return [(t, float(probs[t])) for t in torch.nonzero(probs).flatten().tolist()]

    exact = {(a, b, c): pa * pb * pc for a, pa in support(ids) for b, pb in support(ids + [a])
             for c, pc in support(ids + [a, b])}
    keys = sorted(exact)
    n = 3000
    got = torch.zeros(len(keys), dtype=torch.float64)
    rounds = 0
    for s in range(n):
        out = list(llm.generator.token_stream(ids, SamplingParams(**{**p.__dict__, "seed": s})))
        got[keys.index(tuple(out))] += 1
        rounds += llm.last_stats.rounds
    assert rounds == n  # every run verified a draft
    assert chi_square_p(got, torch.tensor([exact[k] for k in keys], dtype=torch.float64) * n) > 0.01


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_generate_and_bench_sweep(tiny_checkpoints, tmp_path, capsys) -> None:
    from edgellm.cli import main

    # the sweep's passage and code prompts take ~500 tokens with the tiny byte-level tokenizer: a longer context
    ckpt = shutil.copytree(tiny_checkpoints["llama"], tmp_path / "llama")
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 1024}))
    ckpt = str(ckpt)
    base = ["generate", PROMPT, "-m", ckpt, "--dtype", "fp32", "-n", "24", "--no-compile", "--json"]
    assert main(base + ["--speculative", "lookup", "--draft-k", "3"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["speculative"] == "lookup" and out["new_tokens"] <= 24 and 0 <= out["acceptance_rate"] <= 1
    assert main(base) == 0
    assert json.loads(capsys.readouterr().out)["text"] == out["text"]  # greedy: the same text without it
    assert main(base + ["--speculative", "lookup", "--draft-k", "0"]) == 2
    err = capsys.readouterr().err
    assert "draft length K" in err and len(err.strip().splitlines()) == 1

    assert main(["bench", "--task", "speculative", "-m", ckpt, "--dtype", "fp32", "--no-compile", "--speculative",
                 "lookup", "self", "--draft-k", "1", "3", "--new-tokens", "12", "--ignore-eos", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    rows = report["rows"]
    assert report["ignore_eos"] and all(r["new_tokens"] == 12 for r in rows)  # fixed-length answers
    assert [(r["method"], r["task"], r["k"]) for r in rows] == [
        (m, t, k) for m in ("lookup", "self") for t in ("chat", "grounded") for k in ("1", "3", "adaptive")]
    assert all(r["tokens_per_s"] > 0 and r["speedup"] > 0 for r in rows)
    assert all(r["identical"] == "2/2" for r in rows)  # fp32 target: the same text as plain decoding
