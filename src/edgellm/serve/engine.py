"""Continuous batching: many requests decode together, one batched step at a time, on one thread.

A pool of `parallel` KV-cache rows (each `ctx` slots, slot == position). A request takes a free row, is
prefilled in chunks (interleaved with decode steps, so running streams keep flowing), then joins the batched
decode step (`Transformer.batch_decode_step`, or one C call for block-quantized models: native_step.py; every row at
its own position); a finished or cancelled request leaves before the next step and its row keeps its tokens for
prompt-prefix reuse.

Speculation (`speculative="lookup"`): a row whose text so far ends in an n-gram seen earlier in its prompt or answer
(speculative.LookupDrafter) also feeds the tokens that followed it, as extra entries of the same batched step: the
same cache row at the next positions (the step writes every entry's keys/values before any entry attends, and
entry j sees its row's keys up to its own position, so the entries form a causal verify). The outputs are then
taken one position at a time through exactly the sampling code a plain step uses (penalties, bias, grammar, the
request's generator) and the row stops at the first sampled token that differs from the draft. Every entry's
logits equal what a plain step at that position computes (the C step's rows are computed alone), so greedy and
seeded answers equal plain decoding token for token: speculation changes only how many steps an answer takes.
Rejected entries leave keys/values beyond the row's position, which the next step overwrites before anyone
attends to them. The draft length adapts to the request's acceptance and the batch (draft_length): a drafted entry
costs about as much as a row, so a full batch drafts only what is likely to be kept.

Prompt chunks run through the C verify step where the eager forward would take the same int8 kernel
(AVX512-VNNI CPUs: native_step.prefill; each token's keys/values and logits are then bit for bit what decoding
the prompt token by token computes), else through the eager forward.

Prefix reuse is exact: prefills run in fixed chunks of PREFILL_CHUNK positions (chunk boundaries at multiples of
PREFILL_CHUNK from position 0) and only whole chunks written by a prefill are reused. A reused chunk therefore
holds exactly the keys/values a fresh prefill would compute, and, with the batched step's per-row attention, an
answer never depends on the cache's history or on which requests share the step (tested: 32 concurrent clients
get the answers each request gets alone). Keys written by decode steps (an earlier answer) are recomputed.

The asyncio side (serve/app.py) talks to the engine only through `submit` (thread-safe) and each request's
`emit` callback.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import InvalidArgumentError
from ..generate import SamplingParams, apply_repetition_penalty, filter_logits
from ..kernels.blocklinear import BlockQLinear
from ..model import KVCache, Transformer
from ..native_step import NativeStep
from ..speculative import POOL_DECAY, PRIOR_DRAFTS, DraftStats, LookupDrafter, check_k, draft_length
from ..tokenizer import Tokenizer
from .grammar import Matcher
from .metrics import Metrics

PREFILL_CHUNK = 64  # positions per prefill call; also the granularity of prefix reuse
# entries (rows + drafted tokens) in one batched step: below BlockQLinear.DENSE_FROM_ROWS, so every product stays
# on the per-row int8 kernel (a larger step would take dense GEMMs and round unlike a plain step)
STEP_ENTRIES = BlockQLinear.DENSE_FROM_ROWS - 1


@dataclass
class TokenOut:
    """One generated token as the client sees it: its text piece (pieces join to the answer) and logprobs."""

    token: int
    text: str
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None  # (token id, logprob) of the most likely tokens


@dataclass
class Request:
    prompt_ids: list[int]
    params: SamplingParams
    emit: Callable[[str, Any], None]  # ("tokens", list[TokenOut]) ... then ("done", dict) or ("error", str)
    logprobs: int | None = None      # None: off; k >= 0: the chosen token's logprob and the top k
    logit_bias: dict[int, float] = field(default_factory=dict)
    matcher: Matcher | None = None
    cancelled: bool = False
    id: int = field(default_factory=itertools.count().__next__)
    t_submit: float = field(default_factory=time.perf_counter)


@dataclass
class Row:
    index: int
    views: list[KVCache]              # per layer: this row's one-sequence view, for prefills
    tokens: list[int] = field(default_factory=list)  # ids whose keys/values the row holds (slot i = position i)
    exact: int = 0                    # leading positions written by whole prefill chunks (reusable)
    last_used: float = 0.0
    seq: Sequence | None = None


class Sequence:
    """A request running in a row."""

    def __init__(self, req: Request, row: Row, reused: int, tokenizer: Tokenizer, speculate: bool) -> None:
        self.req, self.row = req, row
        self.p = req.params
        self.pos = reused                 # next position to compute
        self.cached = reused
        self.generated: list[int] = []
        self.next_token: int | None = None  # sampled, not yet fed to the model
        self.gen = torch.Generator().manual_seed(self.p.seed) if self.p.seed is not None else None
        self.decoder = tokenizer.stream_decoder(skip_special_tokens=True)
        self.pending: list[TokenOut] = []  # held back: could be the start of a stop string
        self.hold = max((len(s) for s in self.p.stop), default=1) - 1
        self.t_first: float | None = None
        self.t_last = 0.0
        self.context = list(req.prompt_ids)  # prompt + generated tokens: what lookup drafts from
        self.drafter = LookupDrafter() if speculate else None
        self.drafts = DraftStats()          # its drafts so far (adaptive draft length)

    @property
    def prefilling(self) -> bool:
        return self.pos < len(self.req.prompt_ids)


class Engine:
    """Owns the model (nothing else may run it) and a background thread."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, parallel: int, ctx: int, max_queue: int,
                 metrics: Metrics | None = None, speculative: str | None = None, draft_k: int | None = None) -> None:
        """speculative: None or "lookup" (see the module docstring); draft_k: a fixed draft length, None = adaptive
        per request and batch size (draft_length: as long as the expected kept tokens pay for their entries)."""
        if speculative not in (None, "lookup"):
            raise InvalidArgumentError(
                f"the server speculates with prompt lookup only (--speculative lookup), not {speculative!r}: 'self' "
                f"and 'draft' need a second model with a batched cache of its own")
        self.speculative, self.draft_k = speculative, check_k(draft_k)
        self.draft_pool = DraftStats()  # all requests' recent drafts (decayed): each request's prior
        cfg = model.config
        self.model, self.tokenizer = model, tokenizer
        self.parallel, self.ctx, self.max_queue = parallel, ctx, max_queue
        self.metrics = metrics or Metrics()
        self.eos = set(tokenizer.eos_ids)
        self.pool = [KVCache(parallel, cfg.num_kv_heads, ctx, cfg.head_dim, model.dtype, rolling=False)
                     for _ in model.layers]
        self.rows = [Row(r, [c.row(r) for c in self.pool]) for r in range(parallel)]
        model.init_rope(max(ctx, cfg.max_seq_len))
        # block-quantized models decode the batch in one C call (equal to batch_decode_step bit for bit)
        self.native, _ = NativeStep.create(model)
        self.inbox: queue.Queue[Request | Callable[[], None]] = queue.Queue()
        self.waiting: list[Request] = []
        self.running: list[Sequence] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="edgellm-engine", daemon=True)

    # ------------------------------------------------------------------ the asyncio side
    def start(self) -> None:
        """Run the loop on a thread of its own (the server runs it on the thread that loaded the model: run())."""
        self._thread.start()

    def run(self) -> None:
        """Run the loop on the calling thread until stop()."""
        self._thread = threading.current_thread()
        self._loop()

    def stop(self) -> None:
        self._stop.set()
        self.inbox.put(lambda: None)
        if self._thread is not threading.current_thread() and self._thread.is_alive():
            self._thread.join(timeout=10)

    def queue_full(self) -> bool:
        """True when every row is busy and max_queue requests already wait (read from another thread: a
        snapshot, which is all a 503 needs)."""
        return len(self.running) + len(self.waiting) + self.inbox.qsize() >= self.parallel + self.max_queue

    def submit(self, req: Request) -> None:
        self.inbox.put(req)

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run fn on the engine thread between steps (the model is not thread-safe) and return its result."""
        done = threading.Event()
        box: dict[str, Any] = {}

        def job() -> None:
            try:
                box["value"] = fn()
            except BaseException as e:  # re-raised on the caller's thread
                box["error"] = e
            done.set()

        self.inbox.put(job)
        done.wait()
        if "error" in box:
            raise box["error"]
        return box["value"]

    def run_until_done(self) -> None:
        """Batch jobs (evaluation): run steps on the calling thread until every submitted request has finished.
        Nothing else may drive this engine meanwhile; an exception in a step propagates (no request is failed
        quietly)."""
        with torch.inference_mode():
            while True:
                while True:
                    try:
                        item = self.inbox.get_nowait()
                    except queue.Empty:
                        break
                    if isinstance(item, Request):
                        self.waiting.append(item)
                    else:
                        item()
                if not (self.running or self.waiting):
                    return
                self._step()

    # ------------------------------------------------------------------ the engine thread
    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while not self._stop.is_set():
            busy = bool(self.running or self.waiting)
            try:
                item = self.inbox.get(timeout=None if not busy else 0)
            except queue.Empty:
                item = None
            while item is not None:
                if isinstance(item, Request):
                    self.waiting.append(item)
                else:
                    item()
                try:
                    item = self.inbox.get_nowait()
                except queue.Empty:
                    item = None
            try:
                with torch.inference_mode():
                    self._step()
            except Exception as e:  # never let one bad step stop the server: fail the requests involved
                for seq in self.running:
                    self._finish(seq, None, error=f"internal error: {type(e).__name__}: {e}")
                self.running.clear()
            self.metrics.set_gauges(running=len(self.running), waiting=len(self.waiting),
                                    kv_used=sum(len(r.tokens) for r in self.rows if r.seq is not None),
                                    kv_total=self.parallel * self.ctx)

    def _step(self) -> None:
        for seq in [s for s in self.running if s.req.cancelled]:
            self._finish(seq, "cancelled")
        self.waiting = [r for r in self.waiting if not r.cancelled]
        while self.waiting and len(self.running) < self.parallel:
            self._admit(self.waiting.pop(0))
        prefilling = [s for s in self.running if s.prefilling]
        if prefilling:  # one chunk per iteration, oldest request first
            seq = min(prefilling, key=lambda s: s.req.id)
            try:
                self._prefill_chunk(seq)
            except Exception as e:  # fail this request only
                self._finish(seq, None, error=f"internal error: {type(e).__name__}: {e}")
        decoding = [s for s in self.running if not s.prefilling and s.next_token is not None]
        if decoding:
            self._decode(decoding)

    def _admit(self, req: Request) -> None:
        """Give the request the free row sharing the longest reusable prefix (else the least recently used)."""
        ids = req.prompt_ids
        best, best_reuse = None, -1
        for row in self.rows:
            if row.seq is not None:
                continue
            match = 0
            limit = min(row.exact, len(ids) - 1)  # at least the last prompt token is computed (its logits)
            while match < limit and row.tokens[match] == ids[match]:
                match += 1
            reuse = match // PREFILL_CHUNK * PREFILL_CHUNK
            if reuse > best_reuse or reuse == best_reuse and row.last_used < best.last_used:
                best, best_reuse = row, reuse
        assert best is not None
        del best.tokens[best_reuse:]
        best.exact = best_reuse
        seq = Sequence(req, best, best_reuse, self.tokenizer, self.speculative is not None)
        best.seq = seq
        self.running.append(seq)
        self.metrics.prompt_tokens(len(ids), best_reuse)

    def _prefill_chunk(self, seq: Sequence) -> None:
        ids, row = seq.req.prompt_ids, seq.row
        start = seq.pos
        end = min((start // PREFILL_CHUNK + 1) * PREFILL_CHUNK, len(ids))
        self.model.use_caches(row.views)
        chunk = torch.tensor([ids[start:end]])
        # in C where the eager forward would take the same int8 kernel (AVX512-VNNI CPUs; native_step.prefill)
        logits = self.native.prefill(chunk, start) if self.native is not None else None
        if logits is None:
            logits = self.model(chunk, start, use_cache=True, last_only=True)[0, -1]
        row.tokens.extend(ids[start:end])
        if end % PREFILL_CHUNK == 0:
            row.exact = end
        seq.pos = end
        if end == len(ids):
            self._accept(seq, logits.float())

    def _drafts(self, seqs: list[Sequence]) -> list[list[int]]:
        """Each sequence's drafted tokens: none without speculation or while a request's prompt is being prefilled
        (a longer step delays its first token; requests queued for a row gain from rows that finish sooner), else
        lookup drafts of the fixed K or the adaptive length (draft_length), within the step's entry budget (best
        acceptance first), the cache row's length and the tokens the request may still generate."""
        drafts: list[list[int]] = [[] for _ in seqs]
        if self.speculative is None or len(seqs) < len(self.running):
            return drafts  # a prompt is being prefilled: drafted entries would only delay its first token
        budget = STEP_ENTRIES - len(seqs)
        prior = self.draft_pool.rates()
        rates = [s.drafts.rates(prior) for s in seqs]
        for i in sorted(range(len(seqs)), key=lambda i: -rates[i][0]):
            seq = seqs[i]
            # a request's first PRIOR_DRAFTS drafts are at least one token: evidence even in a full batch
            k = self.draft_k or max(draft_length(*rates[i], len(seqs)), int(seq.drafts.first_tried < PRIOR_DRAFTS))
            k = min(k, budget, self.ctx - 1 - seq.pos, seq.p.max_new_tokens - len(seq.generated) - 1)
            if k > 0:
                drafts[i], _ = seq.drafter.propose(seq.context, k, seq.p, None)
                budget -= len(drafts[i])
        return drafts

    def _decode(self, seqs: list[Sequence]) -> None:
        self.model.use_caches(self.pool)
        feeds = [[s.next_token, *d] for s, d in zip(seqs, self._drafts(seqs), strict=True)]
        # one entry per fed token: a sequence's drafts follow its token in its own row at the next positions
        tokens = torch.tensor([[t] for f in feeds for t in f])
        rows = [s.row.index for s, f in zip(seqs, feeds, strict=True) for _ in f]
        pos = [s.pos + j for s, f in zip(seqs, feeds, strict=True) for j in range(len(f))]
        step = self.native.batch_step if self.native is not None else self.model.batch_decode_step
        logits = step(tokens, rows, pos)  # (entries, V)
        greedy = logits.argmax(-1).tolist()  # one call for every entry (per row: ~0.1 ms each)
        at = 0
        for seq, feed in zip(seqs, feeds, strict=True):
            kept = 0
            try:
                for j, token in enumerate(feed):
                    seq.row.tokens.append(token)
                    seq.pos += 1
                    seq.next_token = None
                    self._accept(seq, logits[at + j], greedy[at + j])
                    if seq.next_token is None or j + 1 == len(feed) or seq.next_token != feed[j + 1]:
                        break
                    kept += 1  # the sampled token is the draft fed next: its logits are already computed
            except Exception as e:  # one request's sampling problem must not fail the others
                self._finish(seq, None, error=f"internal error: {type(e).__name__}: {e}")
            at += len(feed)
            if len(feed) > 1:
                seq.drafts.add(len(feed) - 1, kept)
                self.draft_pool.add(len(feed) - 1, kept, POOL_DECAY)
                self.metrics.drafted(len(feed) - 1, kept)

    def _accept(self, seq: Sequence, logits: torch.Tensor, argmax: int | None = None) -> None:
        """Sample the next token from fp32 logits (V,), hand out its text, or finish the sequence. argmax: the
        logits' argmax if already known (greedy requests that change no logit take it)."""
        req, p = seq.req, seq.p
        plain = not req.logit_bias and p.repetition_penalty == 1.0 and req.matcher is None
        if req.logit_bias:
            ids = torch.tensor(list(req.logit_bias))
            logits = logits.index_add(0, ids, torch.tensor(list(req.logit_bias.values()), dtype=logits.dtype))
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(req.prompt_ids + seq.generated)
            logits = apply_repetition_penalty(logits, seen, p.repetition_penalty)
        if req.matcher is not None:
            allowed = req.matcher.mask()
            if not allowed.any():  # the grammar reached a dead end (llguidance reports why)
                return self._finish(seq, None, error=f"response_format: {req.matcher.error or 'no valid token'}")
            logits = logits.masked_fill(~allowed, float("-inf"))
        if p.temperature == 0:
            token = argmax if argmax is not None and plain else int(logits.argmax())
        else:
            probs = filter_logits(logits, p).softmax(-1)
            token = int(torch.multinomial(probs, 1, generator=seq.gen))
        now = time.perf_counter()
        if seq.t_first is None:
            seq.t_first = now
            self.metrics.first_token(now - req.t_submit)
        else:
            self.metrics.token_latency(now - seq.t_last)
        seq.t_last = now
        if token in self.eos:
            return self._finish(seq, "stop")
        if req.matcher is not None:
            req.matcher.consume(token)
        seq.generated.append(token)
        seq.context.append(token)
        self.metrics.generated(1)
        out = TokenOut(token, seq.decoder.push(token))
        if req.logprobs is not None:
            lp = logits.log_softmax(-1)
            out.logprob = float(lp[token])
            if req.logprobs:
                top = lp.topk(req.logprobs)
                out.top = list(zip(top.indices.tolist(), top.values.tolist(), strict=True))
        seq.pending.append(out)
        if self._release(seq, final=False):
            return self._finish(seq, "stop", released=True)
        if len(seq.generated) >= p.max_new_tokens or seq.pos >= self.ctx:
            return self._finish(seq, "length")
        if req.matcher is not None and req.matcher.m.is_stopped():
            return self._finish(seq, "stop")
        seq.next_token = token

    def _release(self, seq: Sequence, final: bool) -> bool:
        """Emit the pending tokens that cannot be part of a stop string; True if a stop string was found
        (the text up to it is emitted, the rest dropped)."""
        text = "".join(t.text for t in seq.pending)
        cut = min((i for i in (text.find(s) for s in seq.p.stop) if i >= 0), default=-1)
        if cut >= 0:
            out, n = [], 0
            for t in seq.pending:
                if n >= cut:
                    break
                t.text = t.text[:cut - n]
                n += len(t.text)
                out.append(t)
            seq.pending = []
            if out:
                seq.req.emit("tokens", out)
            return True
        safe = len(text) if final else len(text) - seq.hold
        out, n = [], 0
        while seq.pending and n + len(seq.pending[0].text) <= safe:
            n += len(seq.pending[0].text)
            out.append(seq.pending.pop(0))
        if out:
            seq.req.emit("tokens", out)
        return False

    def _finish(self, seq: Sequence, reason: str | None, error: str | None = None, released: bool = False) -> None:
        if seq in self.running:
            self.running.remove(seq)
        seq.row.seq = None
        seq.row.last_used = time.perf_counter()
        req = seq.req
        if error is not None:
            req.emit("error", error)
            return
        if not released and reason != "cancelled":
            tail = seq.decoder.flush()
            if tail:
                seq.pending.append(TokenOut(-1, tail))
            if self._release(seq, final=True):
                reason = "stop"
        self.metrics.request_done(reason or "error")
        req.emit("done", {"finish_reason": reason, "prompt_tokens": len(req.prompt_ids),
                          "completion_tokens": len(seq.generated), "cached_tokens": seq.cached})
