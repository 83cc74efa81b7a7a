"""Speculative decoding: a cheap drafter proposes K tokens, the target checks them all in one forward pass over
its KV cache, and every token the target agrees with costs a fraction of a decode step.

Drafters (`--speculative`):
- `lookup`: prompt lookup. The text so far is matched against its earlier occurrences in the prompt + answer
  (ending in the same two tokens); the tokens that followed the longest match (the latest on ties) are the
  draft, at most one fewer than the match is long: a long match predicts a long copy, a two-token one a
  single token. Free to run, and strong whenever the answer copies from the input (rewriting, summarising,
  editing code).
- `self`: the same checkpoint with 4-bit weights drafts for a higher-precision target (fp32/bf16).
- `draft`: another model with the same tokenizer (`--draft-model`).

Exactness. Greedy: a drafted token is kept only if it is the target's argmax at that position, and the
target's own argmax replaces the first one that is not, so the text equals plain greedy decoding of the same
weights. Bit for bit where every op of the step is per row (the default model: int8-activation linears, attention
in kernels/cache_attention.py, exact-rounding compiled steps); with dense fp32/bf16 weights a K-row GEMM may
round unlike a one-row one, so a change there needs a near-exact tie.
Sampling: the rule of Leviathan et al. (2023) / Chen et al. (2023): keep drafted token d with probability
min(1, p(d) / q(d)), else sample from norm(max(0, p - q)) and stop; after K kept tokens, sample one more from
the target. p and q are the target's and drafter's distributions after the same temperature / top-k / top-p /
min-p / repetition-penalty processing, so the output has exactly the distribution of plain sampling. A lookup
draft is deterministic: q is a point mass on d.

KV-cache rollback: the target writes K + 1 positions; rejected ones stay behind as stale slots. Attention
masks by the position each slot holds (positions after the query's are ignored) and the next forward writes
over them, so nothing is copied back. Rolling (sliding-window) caches get K_max spare slots, so a rejected
draft never overwrote a position still inside the window.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .errors import InvalidArgumentError
from .generate import GenerationStats, SamplingParams, apply_repetition_penalty, filter_logits
from .native_step import fast_without_compiling

if TYPE_CHECKING:
    from .generate import Generator
    from .loading import LoadedModel
    from .model import Transformer

METHODS = ("lookup", "self", "draft")
K_MAX = 16           # the largest draft length (the K sweep ends here)
# Adaptive K of model drafters moves along the draft lengths the compiled verify step has a size for
# (fast.VERIFY_SIZES - 1; other K are padded up to the next size and cost as much): up after a fully accepted draft,
# down when fewer than half the drafts were kept. A verified row is not free (default model, AVX512-BF16 path:
# 4 tokens ~9 ms, 1 token ~5.4 ms, so ~23 % of a step per extra row), so short drafts win unless most are kept.
# Adaptive lookup drafts alone take K_MAX, bounded by their match (LookupDrafter); in a batch, see ENTRY_COST.
K_STEPS = (1, 3, 7, 16)
K_START = 3
# Prompt lookup (LookupDrafter): a draft needs a match of at least LOOKUP_MIN_MATCH tokens. Not 1 (HF's default goes
# down to 1): a lone repeated token predicts little (measured: drafts kept 15-30 % of the time) and a verified row is
# not free. The draft is at most match - 1 tokens long; bounding the length by the match instead of drafting K after
# any match (session 15, default model, AMX path, simulated on the bench's answers at ~15 % of a step per verified
# row): grounded answers 1.44 -> 1.60x at K = 7, chat 1.18 -> 1.22x (measured by the bench: 1.24 -> 1.44x and
# 1.13 -> 1.19x). The latest LOOKUP_CANDIDATES occurrences of the text's last two tokens are compared, each over at
# most K + 1 tokens (a longer match drafts no more).
LOOKUP_MIN_MATCH = 2  # the index is of token pairs
LOOKUP_CANDIDATES = 64

# Adaptive draft length for lookup drafts (no fixed K; model drafters use K_STEPS: their drafts cost steps of their
# own). An entry of a verify or batched step costs about ENTRY_COST of a one-row step whatever the batch (default
# model, AMX path: 1 entry 4.4-5.2 ms, 8 entries 10-11.5 ms: 0.17-0.19), so a step of R rows costs
# 1 + ENTRY_COST (R - 1) for R tokens. A request's drafted tokens are kept with probability a (the first) and
# a b^(j-1) (the j-th: b is the chance that a kept token's successor is kept too; copies come in runs, so b > a);
# both are the request's own shares, starting from a prior (the server: all requests' recent shares) worth
# PRIOR_DRAFTS drafts of its own. The j-th token is drafted while its expected value pays for its entry:
# a b^(j-1) (1 + ENTRY_COST (R - 1)) / R > ENTRY_COST. One stream drafts freely; a full batch only likely copies
# (there a request's first PRIOR_DRAFTS drafts are at least one token, else a full batch would never learn that).
ENTRY_COST = 0.2
PRIOR_DRAFTS = 4
POOL_DECAY = 0.99  # per drafted token: the engine-wide shares follow the recent requests


def target_load_options(method: str | None, dtype: str | torch.dtype, keep_quantized: bool | None
                        ) -> tuple[str | torch.dtype, bool | None]:
    """How to load the target: `self` wants full-precision answers at close to 4-bit speed, so dtype "auto" means
    an fp32 target and a GGUF's blocks are dequantized (its 4-bit copy is the draft); other methods change nothing."""
    if method != "self":
        return dtype, keep_quantized
    return ("fp32" if dtype == "auto" else dtype), (False if keep_quantized is None else keep_quantized)


def check_k(k: int | None) -> int | None:
    if k is not None and (not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= K_MAX):
        raise InvalidArgumentError(f"draft length K must be an integer in [1, {K_MAX}] or None = adaptive (got {k!r})")
    return k


# ---------------------------------------------------------------------------------------------- drafters
class LookupDrafter:
    """Prompt lookup (see module docstring): deterministic drafts, no model. The earlier occurrences of every two
    tokens are kept in an index grown with the context (one dict lookup per draft, then a short comparison per
    candidate, instead of a scan of the whole context), so `propose` expects the list it saw last, appended to; any
    other list starts a new index."""

    name = "lookup"

    def __init__(self) -> None:
        self._context: list[int] | None = None
        self._indexed = 0  # len(context) when the index was last extended
        self._ends: dict[tuple[int, int], list[int]] = {}  # two tokens -> the ends e of their occurrences, in order

    def start(self, prompt_ids: list[int], cache_len: int, slack: int) -> None:
        self._context = None

    def _index(self, context: list[int]) -> None:
        """Index every pair of tokens that some token follows (end e <= len - 1)."""
        if context is not self._context or len(context) < self._indexed:
            self._context, self._indexed, self._ends = context, 0, {}
        for e in range(max(LOOKUP_MIN_MATCH, self._indexed), len(context)):
            self._ends.setdefault((context[e - 2], context[e - 1]), []).append(e)
        self._indexed = len(context)

    def propose(self, context: list[int], k: int, p: SamplingParams,
                gen: torch.Generator | None) -> tuple[list[int], torch.Tensor | None]:
        self._index(context)
        ends = self._ends.get(tuple(context[-2:])) if k > 0 and len(context) >= 2 else None
        if not ends:
            return [], None
        cap, L = k + 1, len(context)  # a match of k + 1 tokens already drafts all k
        best, best_end = 0, -1
        for e in reversed(ends[-LOOKUP_CANDIDATES:]):  # latest first: it wins ties
            n = LOOKUP_MIN_MATCH
            while n < cap and e - n - 1 >= 0 and context[e - n - 1] == context[L - n - 1]:
                n += 1
            if n > best:
                best, best_end = n, e
                if n == cap:
                    break
        return context[best_end:best_end + min(k, best - 1)], None

    def accept(self, n_accepted: int) -> None:
        pass


class ModelDrafter:
    """A small (or 4-bit) model with its own KV cache, stepped one token at a time (compiled when it can be).

    `fed` counts the context tokens whose keys/values are in the draft cache; `logits` are the draft's
    next-token logits after them."""

    def __init__(self, name: str, model: Transformer, compiled: bool | None) -> None:
        self.name = name
        self.model = model
        self.compiled = None
        if compiled or compiled is None and fast_without_compiling(model):
            from .fast import CompiledDecoder

            self.compiled = CompiledDecoder(model)
        self.fed = 0
        self.logits: torch.Tensor | None = None
        self._drafted = 0

    @property
    def compile_s(self) -> float:
        return self.compiled.compile_s if self.compiled is not None else 0.0

    def start(self, prompt_ids: list[int], cache_len: int, slack: int) -> None:
        self.model.setup_cache(1, cache_len, slack=slack)
        self.fed, self.logits = 0, None

    def _feed(self, token: int, pos: int) -> torch.Tensor:
        t, ps = torch.tensor([[token]]), torch.tensor([pos])
        if self.compiled is not None:
            return self.compiled.step(t, ps)[0]
        return self.model(t, pos, use_cache=True)[0, -1].float()

    def propose(self, context: list[int], k: int, p: SamplingParams,
                gen: torch.Generator | None) -> tuple[list[int], torch.Tensor | None]:
        if self.fed == 0:  # the prompt, in one prefill
            self.logits = self.model(torch.tensor([context]), 0, use_cache=True, last_only=True)[0, -1].float()
            self.fed = len(context)
        while self.fed < len(context):  # the target's last token(s), one step each
            self.logits = self._feed(context[self.fed], self.fed)
            self.fed += 1
        drafts: list[int] = []
        qs = []
        logits = self.logits
        for i in range(k):
            if i:
                logits = self._feed(drafts[-1], len(context) + i - 1)
            if p.repetition_penalty != 1.0:
                logits = apply_repetition_penalty(logits, torch.tensor(context + drafts), p.repetition_penalty)
            if p.temperature == 0:
                drafts.append(int(logits.argmax()))
            else:
                q = filter_logits(logits, p).softmax(-1)
                drafts.append(int(torch.multinomial(q, 1, generator=gen)))
                qs.append(q)
        self._drafted = len(drafts)
        return drafts, (torch.stack(qs) if qs else None)

    def accept(self, n_accepted: int) -> None:
        # The draft fed its drafts 1..K-1 (not the last): those the target kept are valid cache entries.
        self.fed += min(n_accepted, max(self._drafted - 1, 0))


@dataclass
class DraftStats:
    """Kept drafts, for the adaptive draft length: first drafted tokens tried / kept, and later ones tried (their
    predecessor was kept) / kept. Floats: the engine-wide pool decays (POOL_DECAY per drafted token)."""

    first_tried: float = 0.0
    first_kept: float = 0.0
    next_tried: float = 0.0
    next_kept: float = 0.0

    def add(self, drafted: int, kept: int, decay: float = 1.0) -> None:
        d = decay ** drafted
        self.first_tried = self.first_tried * d + 1
        self.first_kept = self.first_kept * d + (kept > 0)
        self.next_tried = self.next_tried * d + min(kept, drafted - 1)
        self.next_kept = self.next_kept * d + max(kept - 1, 0)

    def rates(self, prior: tuple[float, float] = (0.5, 0.5)) -> tuple[float, float]:
        """(a, b) with PRIOR_DRAFTS pseudo-drafts at the prior's rates."""
        return ((self.first_kept + PRIOR_DRAFTS * prior[0]) / (self.first_tried + PRIOR_DRAFTS),
                (self.next_kept + PRIOR_DRAFTS * prior[1]) / (self.next_tried + PRIOR_DRAFTS))


def draft_length(a: float, b: float, rows: int) -> int:
    """The adaptive draft length (see ENTRY_COST) in a step of `rows` requests, the first drafted token kept with
    probability a, each next one (after a kept one) with b: the largest j <= K_MAX with
    a b^(j-1) (1 + ENTRY_COST (rows - 1)) / rows > ENTRY_COST."""
    value = (1 + ENTRY_COST * (rows - 1)) / rows  # a token's share of a plain step, in one-row steps
    n, p = 0, a
    while n < K_MAX and p * value > ENTRY_COST:
        n, p = n + 1, p * b
    return n


# ---------------------------------------------------------------------------------------------- the rule
def residual(p: torch.Tensor, q: torch.Tensor | None, d: int) -> torch.Tensor:
    """Where to resample after drafted token d is rejected: norm(max(0, p - q)); q None = point mass on d."""
    if q is None:
        r = p.clone()
        r[d] = 0.0
    else:
        r = (p - q).clamp_min(0.0)
    return r


def verify(target_logits: torch.Tensor, drafts: list[int], q: torch.Tensor | None, seen: list[int],
           p: SamplingParams, gen: torch.Generator | None) -> tuple[list[int], int]:
    """target_logits (K+1, V) fp32 at the positions of the last accepted token and the K drafts.

    Returns the tokens to emit (the kept drafts, then the target's correction or its bonus token) and how many
    drafts were kept."""
    out: list[int] = []
    for i in range(len(drafts) + 1):
        logits = target_logits[i]
        if p.repetition_penalty != 1.0:
            logits = apply_repetition_penalty(logits, torch.tensor(seen + drafts[:i]), p.repetition_penalty)
        if p.temperature == 0:
            best = int(logits.argmax())
            out.append(best)
            if i == len(drafts) or best != drafts[i]:
                return out, i
            continue
        probs = filter_logits(logits, p).softmax(-1)
        if i == len(drafts):  # every draft kept: one more token from the target
            out.append(int(torch.multinomial(probs, 1, generator=gen)))
            return out, i
        d = drafts[i]
        q_d = 1.0 if q is None else float(q[i, d])
        u = float(torch.rand((), generator=gen))
        if u * q_d < float(probs[d]):  # u < p(d) / q(d), without dividing by a tiny q(d)
            out.append(d)
            continue
        r = residual(probs, None if q is None else q[i], d)
        total = float(r.sum())
        out.append(int(torch.multinomial(r / total if total > 0 else probs, 1, generator=gen)))
        return out, i
    raise AssertionError("unreachable")


# ---------------------------------------------------------------------------------------------- the loop
@dataclass
class Speculator:
    """A drafter plus the draft length: K fixed, or adaptive (None)."""

    drafter: LookupDrafter | ModelDrafter
    k: int | None = None

    @property
    def method(self) -> str:
        return self.drafter.name

    def tokens(self, g: Generator, prompt_ids: list[int], p: SamplingParams) -> Iterator[int]:
        """Generator.token_stream with speculation: same contract (yields new ids, fills g.stats)."""
        return speculative_tokens(g, self, prompt_ids, p)


def speculative_tokens(g: Generator, spec: Speculator, prompt_ids: list[int], p: SamplingParams) -> Iterator[int]:
    stats = g.stats = GenerationStats(prompt_tokens=len(prompt_ids), speculative=spec.method)
    gen = torch.Generator().manual_seed(p.seed) if p.seed is not None else None
    eos = set() if p.ignore_eos else set(g.tokenizer.eos_ids)
    needed = len(prompt_ids) + p.max_new_tokens
    cache_len = g.cache_len_for(needed + K_MAX)  # + the compiled verify step's padding
    g.model.setup_cache(1, cache_len, slack=K_MAX)
    spec.drafter.start(prompt_ids, cache_len, K_MAX)
    fast = g.verifier

    def target(ids: list[int], pos: int) -> torch.Tensor:  # (T, V) fp32 logits at positions pos..
        if fast is None:
            return g.model.verify_step(torch.tensor([ids]), torch.arange(pos, pos + len(ids)))[0]
        if len(ids) == 1:  # nothing drafted: a decode step (the same rounding; a padded verify costs more)
            return fast.step(torch.tensor([ids]), torch.tensor([pos]))
        return fast.verify(torch.tensor([ids]), torch.arange(pos, pos + len(ids)))[0]

    t0 = time.perf_counter()
    t_first: float | None = None
    stats.finish_reason = "length"
    # adaptive lookup alone: drafts as long as their match allows (one row is cheap next to a step; session 15's K
    # sweep: grounded K = 16 1.42-1.50x, adaptive by kept shares 1.36x, by K steps 1.34x)
    lookup_alone = spec.k is None and isinstance(spec.drafter, LookupDrafter)
    k = K_MAX if lookup_alone else spec.k or K_START
    context = list(prompt_ids)
    try:
        with torch.inference_mode():
            logits = g.model(torch.tensor([prompt_ids]), 0, use_cache=True, last_only=True)[0].float()  # (1, V)
        emit, _ = verify(logits, [], None, context, p, gen)
        while True:
            for token in emit:
                if t_first is None:
                    t_first = time.perf_counter()
                    stats.prefill_ms = (t_first - t0) * 1e3
                if token in eos:
                    stats.finish_reason = "eos"
                    return
                context.append(token)
                stats.new_tokens += 1
                yield token
                if stats.new_tokens == p.max_new_tokens:
                    return
                _finish(stats, t0, t_first)
            left = p.max_new_tokens - stats.new_tokens
            with torch.inference_mode():
                drafts, q = spec.drafter.propose(context, min(k, left - 1), p, gen) if left > 1 else ([], None)
                logits = target(context[-1:] + drafts, len(context) - 1)  # (K+1, V)
                emit, kept = verify(logits, drafts, q, context, p, gen)
            spec.drafter.accept(kept)
            if drafts:
                stats.rounds += 1
                stats.drafted += len(drafts)
                stats.accepted += kept
                if spec.k is None and not lookup_alone:
                    i = K_STEPS.index(k)
                    if kept == len(drafts) == k:
                        k = K_STEPS[min(i + 1, len(K_STEPS) - 1)]
                    elif 2 * kept < len(drafts):
                        k = K_STEPS[max(i - 1, 0)]
    finally:
        _finish(stats, t0, t_first)


def _finish(stats: GenerationStats, t0: float, t_first: float | None) -> None:
    now = time.perf_counter()
    stats.total_s = now - t0
    if stats.new_tokens > 1 and t_first is not None:
        stats.time_per_token_ms = (now - t_first) * 1e3 / (stats.new_tokens - 1)
        stats.tokens_per_s = 1e3 / stats.time_per_token_ms
    if stats.drafted:
        stats.acceptance_rate = stats.accepted / stats.drafted
        stats.mean_accepted = stats.accepted / stats.rounds


# ---------------------------------------------------------------------------------------------- building
def _low_bit(model: Transformer) -> bool:
    from .kernels.blocklinear import BlockQLinear
    from .quant.linear import QLinearPerGrp

    return any(isinstance(m, BlockQLinear | QLinearPerGrp) for m in model.modules())


def self_draft(target: LoadedModel) -> Transformer:
    """The target's checkpoint with 4-bit weights: a GGUF's own Q4/Q8 blocks, else RTN int4 per group of 32."""
    from .loading import load_model, parse_dtype
    from .quant import quantize_model
    from .quant.spec import parse_quant

    if _low_bit(target.model):
        raise InvalidArgumentError(
            "self-speculation drafts with 4-bit weights for a higher-precision target, but this model already "
            "runs low-bit weights: load the target with --dtype fp32 or bf16")
    if target.format == "gguf":
        draft = load_model(target.path, dtype="auto", keep_quantized=True)
        if _low_bit(draft.model):
            return draft.model
    else:
        draft = load_model(target.path, dtype="fp32")
    quantize_model(draft.model, parse_quant("rtn:w4:g32"), draft.tokenizer, dtype=parse_dtype("auto"),
                   log=lambda _: None)
    return draft.model


def separate_draft(target: LoadedModel, draft_model: str | Path, dtype: str | torch.dtype) -> Transformer:
    """A draft checkpoint that must share the target's tokenizer (the same token ids mean the same text)."""
    from .loading import load_model

    draft = load_model(draft_model, dtype=dtype)
    tv, dv = target.tokenizer.backend.get_vocab(), draft.tokenizer.backend.get_vocab()
    if tv != dv or target.config.vocab_size != draft.config.vocab_size:
        differ = sum(1 for t, i in tv.items() if dv.get(t) != i) + abs(len(tv) - len(dv))
        raise InvalidArgumentError(
            f"draft model {draft_model} does not share the target's vocabulary ({len(dv)} vs {len(tv)} tokens, "
            f"{differ} differ; logits {draft.config.vocab_size} vs {target.config.vocab_size}): speculative "
            f"decoding needs identical tokenizers")
    return draft.model


def build_speculator(method: str, target: LoadedModel, *, k: int | None = None, draft_model: str | Path | None = None,
                     draft_dtype: str | torch.dtype = "auto", compile: bool | None = None) -> Speculator:
    """The Speculator for `method` ("lookup" | "self" | "draft") over the loaded target."""
    check_k(k)
    if method not in METHODS:
        raise InvalidArgumentError(f"unknown speculative method {method!r}; choose from {', '.join(METHODS)}")
    if draft_model is not None and method != "draft":
        raise InvalidArgumentError("a draft model is given, but the speculative method is not 'draft'")
    if method == "lookup":
        return Speculator(LookupDrafter(), k)
    if method == "self":
        return Speculator(ModelDrafter("self", self_draft(target), compile), k)
    if draft_model is None:
        raise InvalidArgumentError("speculative method 'draft' needs a draft model (--draft-model PATH)")
    return Speculator(ModelDrafter("draft", separate_draft(target, draft_model, draft_dtype), compile), k)
