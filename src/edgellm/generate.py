"""Sampling and the prefill/decode loop over a static KV cache."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field

import torch

from .errors import ContextLengthError, InvalidArgumentError
from .model import Transformer
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
        checks = [
            (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1, "max_new_tokens must be >= 1"),
            (self.temperature >= 0, "temperature must be >= 0 (0 = greedy)"),
            (isinstance(self.top_k, int) and self.top_k >= 0, "top_k must be an integer >= 0 (0 = off)"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (0 <= self.min_p < 1, "min_p must be in [0, 1)"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0 (1 = off)"),
        ]
        for ok, message in checks:
            if not ok:
                raise InvalidArgumentError(f"invalid sampling value: {message}")
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        if any(not s for s in self.stop):
            raise InvalidArgumentError("invalid sampling value: stop strings must be non-empty")
        return self


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    total_s: float = 0.0
    prefill_ms: float = 0.0
    time_per_token_ms: float = 0.0
    tokens_per_s: float = 0.0
    finish_reason: str = ""  # "eos" | "length" | "stop"

    def to_dict(self) -> dict:
        return asdict(self)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    # As in HF/CTRL: divide positive logits, multiply negative ones, for every token already present.
    scores = logits.gather(-1, seen)
    scores = torch.where(scores > 0, scores / penalty, scores * penalty)
    return logits.scatter(-1, seen, scores)


def sample_next(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None) -> int:
    """Pick the next id from fp32 logits (V,) with temperature, top-k, top-p and min-p filtering."""
    if p.temperature == 0:
        return int(logits.argmax())
    logits = logits / p.temperature
    if p.top_k > 0 and p.top_k < logits.shape[-1]:
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens before it already cover top_p (the first token always stays)
        drop = (probs.cumsum(-1) - probs) >= p.top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    if p.min_p > 0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < p.min_p * probs.max(), float("-inf"))
    probs = logits.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))


class Generator:
    """Runs one prompt at a time through prefill and token-by-token decode."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, max_context: int) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.max_context = max_context
        self.stats = GenerationStats()

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

    @torch.inference_mode()
    def token_stream(self, prompt_ids: list[int], p: SamplingParams) -> Iterator[int]:
        """Yield new token ids; fills self.stats as it goes (final values once exhausted)."""
        p.validate()
        self.check_length(len(prompt_ids), p.max_new_tokens)
        stats = self.stats = GenerationStats(prompt_tokens=len(prompt_ids))
        gen = torch.Generator().manual_seed(p.seed) if p.seed is not None else None
        eos = set() if p.ignore_eos else set(self.tokenizer.eos_ids)
        seen = torch.tensor(prompt_ids, dtype=torch.long)
        self.model.setup_cache(1, len(prompt_ids) + p.max_new_tokens)

        t0 = time.perf_counter()
        ids = torch.tensor([prompt_ids], dtype=torch.long)
        logits = self.model(ids, 0, use_cache=True, last_only=True)[0, -1].float()  # (V,)
        pos = len(prompt_ids)
        t_first = None
        stats.finish_reason = "length"
        for i in range(p.max_new_tokens):
            if p.repetition_penalty != 1.0:
                logits = apply_repetition_penalty(logits, seen, p.repetition_penalty)
            token = sample_next(logits, p, gen)
            if t_first is None:
                t_first = time.perf_counter()
                stats.prefill_ms = (t_first - t0) * 1e3
            stats.new_tokens = i + 1
            if token in eos:
                stats.finish_reason = "eos"
                stats.new_tokens = i  # the EOS token is not part of the answer
                break
            yield token
            if i + 1 == p.max_new_tokens:
                break
            if p.repetition_penalty != 1.0:
                seen = torch.cat([seen, torch.tensor([token])])
            logits = self.model(torch.tensor([[token]]), pos, use_cache=True)[0, -1].float()
            pos += 1
            self._finish(stats, t0, t_first)
        self._finish(stats, t0, t_first)

    @staticmethod
    def _finish(stats: GenerationStats, t0: float, t_first: float | None) -> None:
        now = time.perf_counter()
        stats.total_s = now - t0
        steps = max(stats.new_tokens - 1, 0)
        if steps and t_first is not None:
            stats.time_per_token_ms = (now - t_first) * 1e3 / steps
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
                    if pending[:cut]:
                        yield pending[:cut]
                    self.stats.finish_reason = "stop"
                    tokens.close()
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
