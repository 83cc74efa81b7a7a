"""Sampling and the prefill/decode loop over a static KV cache."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch

from .errors import ContextLengthError, InvalidArgumentError
from .model import Transformer
from .native_step import fast_without_compiling
from .tokenizer import Tokenizer


@dataclass
class SamplingParams:
    """temperature == 0 means greedy decoding (then top_k/top_p/min_p are ignored)."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: Sequence[str] = field(default_factory=tuple)
    ignore_eos: bool = False

    def validate(self) -> SamplingParams:
        """Check every value (raising InvalidArgumentError naming the bad one); normalise `stop` to a tuple."""

        def is_int(v: object) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v: object) -> bool:
            return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)

        checks = [
            (is_int(self.max_new_tokens) and self.max_new_tokens >= 1,
             f"max_new_tokens must be an integer >= 1 (got {self.max_new_tokens!r})"),
            (is_num(self.temperature) and self.temperature >= 0,
             f"temperature must be a finite number >= 0, 0 = greedy (got {self.temperature!r})"),
            (is_int(self.top_k) and self.top_k >= 0, f"top_k must be an integer >= 0, 0 = off (got {self.top_k!r})"),
            (is_num(self.top_p) and 0 < self.top_p <= 1, f"top_p must be in (0, 1] (got {self.top_p!r})"),
            (is_num(self.min_p) and 0 <= self.min_p < 1, f"min_p must be in [0, 1) (got {self.min_p!r})"),
            (is_num(self.repetition_penalty) and self.repetition_penalty > 0,
             f"repetition_penalty must be a finite number > 0, 1 = off (got {self.repetition_penalty!r})"),
            (self.seed is None or is_int(self.seed), f"seed must be an integer or None (got {self.seed!r})"),
        ]
        for ok, message in checks:
            if not ok:
                raise InvalidArgumentError(f"invalid sampling value: {message}")
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        if not isinstance(self.stop, Sequence) or not all(isinstance(s, str) for s in self.stop):
            raise InvalidArgumentError(f"invalid sampling value: stop must be a string or a list of strings "
                                       f"(got {self.stop!r})")
        self.stop = tuple(self.stop)
        if any(not s for s in self.stop):
            raise InvalidArgumentError("invalid sampling value: stop strings must be non-empty")
        return self

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> SamplingParams:
        """Build and validate; an unknown keyword is an InvalidArgumentError naming it (not a TypeError)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise InvalidArgumentError(f"unknown sampling argument(s) {unknown}; valid: {sorted(known)}")
        return cls(**kwargs).validate()


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    total_s: float = 0.0
    prefill_ms: float = 0.0
    time_per_token_ms: float = 0.0
    tokens_per_s: float = 0.0
    finish_reason: str = ""  # "eos" | "length" | "stop"
    # speculative decoding (edgellm/speculative.py); zeros without it
    speculative: str = ""        # the method: "lookup" | "self" | "draft"
    drafted: int = 0             # tokens proposed by the drafter
    accepted: int = 0            # ... of which the target kept
    rounds: int = 0              # verification forwards that checked at least one drafted token
    acceptance_rate: float = 0.0  # accepted / drafted
    mean_accepted: float = 0.0   # accepted tokens per round (each round also yields one token of the target's)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    # As in HF/CTRL: divide positive logits, multiply negative ones, for every token already present.
    scores = logits.gather(-1, seen)
    scores = torch.where(scores > 0, scores / penalty, scores * penalty)
    return logits.scatter(-1, seen, scores)


def filter_logits(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p filtering (removed tokens get -inf), in the order and with the
    exact rules of transformers' TemperatureLogitsWarper, TopK-, TopP- and MinPLogitsWarper (one token kept)."""
    logits = logits / p.temperature
    if 0 < p.top_k < logits.shape[-1]:
        kth = torch.topk(logits, p.top_k).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        # ascending order: drop the low tail whose total probability is <= 1 - top_p; the top token always stays
        sorted_logits, order = torch.sort(logits, descending=False)
        drop = sorted_logits.softmax(-1).cumsum(-1) <= (1 - p.top_p)
        drop[..., -1:] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    if p.min_p > 0:
        probs = logits.softmax(-1)
        drop = probs < p.min_p * probs.amax(-1, keepdim=True)
        drop.scatter_(-1, probs.argmax(-1, keepdim=True), False)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None) -> int:
    """Pick the next id from fp32 logits (V,): argmax when temperature == 0, else sample the filtered softmax."""
    if p.temperature == 0:
        return int(logits.argmax())
    probs = filter_logits(logits, p).softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))


class Generator:
    """Runs one prompt at a time through prefill and token-by-token decode."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, max_context: int, compile: bool | None = False,
                 speculator: Any = None) -> None:
        """compile: True, the fast decode step (in C, or torch.compile'd where C cannot run the model); None, the
        fast step only where it needs no compiling (native_step.py), else eager; False, eager."""
        self.model = model
        self.tokenizer = tokenizer
        self.max_context = max_context
        self.stats = GenerationStats()
        self.speculator = speculator  # a speculative.Speculator, or None for one token per forward
        self.compiled = None
        self.verifier = None  # speculation's target steps: compiled with eager's exact bf16 rounding
        if compile is None:
            compile = fast_without_compiling(model)
        if compile:
            from .fast import CompiledDecoder

            self.compiled = CompiledDecoder(model)
            if speculator is not None and self.compiled.enabled:  # the plain steps, when they round exactly
                exact = self.compiled.exact or model.dtype not in (torch.bfloat16, torch.float16)
                self.verifier = self.compiled if exact else CompiledDecoder(model, exact=True)

    @property
    def compile_s(self) -> float:
        """Seconds spent compiling (or loading cached compiled code for) the decode steps so far."""
        steps = (self.compiled, self.verifier, getattr(self.speculator and self.speculator.drafter, "compiled", None))
        return sum(c.compile_s for c in {id(c): c for c in steps if c is not None}.values())

    @property
    def note(self) -> str:
        return self.compiled.note if self.compiled is not None else ""

    def check_length(self, prompt_len: int, max_new_tokens: int) -> None:
        if prompt_len == 0:
            raise InvalidArgumentError("the prompt is empty (0 tokens)")
        if prompt_len >= self.max_context:
            raise ContextLengthError(
                f"prompt is {prompt_len} tokens; the model's context is {self.max_context} tokens"
            )
        if prompt_len + max_new_tokens > self.max_context:
            raise ContextLengthError(
                f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's context "
                f"of {self.max_context}; lower max_new_tokens to {self.max_context - prompt_len} or less"
            )

    def cache_len_for(self, needed: int) -> int:
        """KV-cache slots for a generation that ends at position `needed`."""
        if self.compiled is None:
            return needed
        from .fast import bucket

        # Fixed cache sizes so the compiled step sees a handful of shapes, never one per prompt.
        return min(bucket(needed), max(self.max_context, needed))

    def token_stream(self, prompt_ids: list[int], p: SamplingParams) -> Iterator[int]:
        """Yield new token ids; fills self.stats as it goes (final values once exhausted)."""
        p.validate()
        self.check_length(len(prompt_ids), p.max_new_tokens)
        if self.speculator is not None:
            return self.speculator.tokens(self, prompt_ids, p)
        return self._plain_tokens(prompt_ids, p)

    @torch.inference_mode()
    def _plain_tokens(self, prompt_ids: list[int], p: SamplingParams) -> Iterator[int]:
        stats = self.stats = GenerationStats(prompt_tokens=len(prompt_ids))
        gen = torch.Generator().manual_seed(p.seed) if p.seed is not None else None
        eos = set() if p.ignore_eos else set(self.tokenizer.eos_ids)
        seen = torch.tensor(prompt_ids, dtype=torch.long)
        fast = self.compiled
        self.model.setup_cache(1, self.cache_len_for(len(prompt_ids) + p.max_new_tokens))

        t0 = time.perf_counter()
        t_first: float | None = None
        decodes = 0  # one-token forward passes after the prefill
        stats.finish_reason = "length"
        try:  # the finally also runs when the consumer closes the stream early (stop string, break)
            ids = torch.tensor([prompt_ids], dtype=torch.long)
            logits = self.model(ids, 0, use_cache=True, last_only=True)[0, -1].float()  # (V,)
            pos = len(prompt_ids)
            for i in range(p.max_new_tokens):
                if p.repetition_penalty != 1.0:
                    logits = apply_repetition_penalty(logits, seen, p.repetition_penalty)
                token = sample_next(logits, p, gen)
                if t_first is None:
                    t_first = time.perf_counter()
                    stats.prefill_ms = (t_first - t0) * 1e3
                if token in eos:
                    stats.finish_reason = "eos"  # the EOS token is not part of the answer
                    break
                stats.new_tokens = i + 1
                yield token
                if i + 1 == p.max_new_tokens:
                    break
                if p.repetition_penalty != 1.0:
                    seen = torch.cat([seen, torch.tensor([token])])
                if fast is not None:
                    logits = fast.step(torch.tensor([[token]]), torch.tensor([pos]))[0]
                else:  # the step the fast path compiles, run eagerly (so both round alike)
                    logits = self.model.decode_step(torch.tensor([[token]]), torch.tensor([pos]))[0]
                pos += 1
                decodes += 1
                self._finish(stats, t0, t_first, decodes)
        finally:
            self._finish(stats, t0, t_first, decodes)

    @staticmethod
    def _finish(stats: GenerationStats, t0: float, t_first: float | None, decodes: int) -> None:
        """total_s from the start of the prefill; time/token averages the one-token decode steps."""
        now = time.perf_counter()
        stats.total_s = now - t0
        if decodes and t_first is not None:
            stats.time_per_token_ms = (now - t_first) * 1e3 / decodes
            stats.tokens_per_s = 1e3 / stats.time_per_token_ms

    def text_stream(self, prompt_ids: list[int], p: SamplingParams) -> Iterator[str]:
        """Yield decoded text pieces; honours stop strings (the stop string itself is not emitted)."""
        decoder = self.tokenizer.stream_decoder(skip_special_tokens=True)
        stops = list(p.stop)
        hold = max((len(s) for s in stops), default=1) - 1
        pending = ""
        tokens = self.token_stream(prompt_ids, p)
        for token in tokens:
            pending += decoder.push(token)
            if stops:
                cut = min((i for i in (pending.find(s) for s in stops) if i >= 0), default=-1)
                if cut >= 0:
                    tokens.close()  # stop decoding before handing out the last piece
                    self.stats.finish_reason = "stop"
                    if pending[:cut]:
                        yield pending[:cut]
                    return
                # keep back a tail that could be the start of a stop string
                safe = len(pending) - hold
                if safe > 0:
                    yield pending[:safe]
                    pending = pending[safe:]
            elif pending:
                yield pending
                pending = ""
        pending += decoder.flush()
        if stops:
            cut = min((i for i in (pending.find(s) for s in stops) if i >= 0), default=-1)
            if cut >= 0:
                pending = pending[:cut]
                self.stats.finish_reason = "stop"
        if pending:
            yield pending
