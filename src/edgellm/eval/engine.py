"""Batched scoring on top of `llm.model`: equal-length windows (perplexity) and groups of prompts that share a
token prefix (MMLU / multiple-choice), with the prefix's KV cache computed once and copied across the batch.

The model has no padding mask, so prompts of different lengths are right-padded: with a causal mask the real
tokens never see the pads, and we read the logits at each row's own positions. Batches are planned from the
full item list before anything is skipped, so a resumed run recomputes exactly the same batches (same shapes,
same numbers) as an uninterrupted one.

Prompts that share a prefix without a KV-cache group of their own (a question and its answer choices) are packed:
one row holds the prefix once, then each prompt's own tokens as a segment that sees the prefix and itself only
(`model.Packed`: per-token positions and a segment mask in the attention kernels), so the prefix is computed once
instead of once per choice.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..model import Packed
from .cache import ResultStore

DEFAULT_BATCH_TOKENS = 4096   # tokens per forward call (rows x padded length)
MAX_ROWS = 64                 # rows per forward call
MIN_SHARED_PREFIX = 16        # below this, prompts run whole (no KV-cache reuse)
MIN_PACKED_PREFIX = 8         # prompts sharing at least this many leading tokens may be packed into one row
MAX_PACKED_ROW = 1024         # tokens per packed row
CACHE_BYTES = 1 << 30         # KV-cache budget for prefix sharing


# Bumped whenever edgellm's forward numerics change (e.g. 2: blocked bf16 attention, 3: packed rows, 4: int8
# activations in AVX512-VNNI prefill), so cached results computed by an older version are not mixed into new runs.
NUMERICS_VERSION = 4


def model_fingerprint(llm: Any) -> dict[str, Any]:
    """What identifies a model's numbers: the file(s) read (path and size), the compute dtype and the
    version of edgellm's numerics."""
    path = Path(llm.loaded.path)
    if path.is_file():
        size = path.stat().st_size
    else:
        size = sum(p.stat().st_size for p in sorted(path.glob("*")) if p.is_file()
                   and p.suffix in (".safetensors", ".gguf", ".bin", ".json"))
    return {"path": str(path.resolve()), "size": size, "dtype": str(llm.dtype).replace("torch.", ""),
            "numerics": NUMERICS_VERSION}


def common_prefix_len(seqs: Sequence[Sequence[int]]) -> int:
    if not seqs:
        return 0
    first = seqs[0]
    n = min(len(s) for s in seqs)
    for s in seqs[1:]:
        i = 0
        while i < n and s[i] == first[i]:
            i += 1
        n = i
        if n == 0:
            break
    return n


@contextlib.contextmanager
def select_positions(model: torch.nn.Module, rows: torch.Tensor, cols: torch.Tensor) -> Iterator[bool]:
    """Make the model's final norm (and so lm_head) run only on hidden states [rows, cols] -> logits (1, N, V).

    Yields False (nothing hooked; the caller gathers from full logits) if the model has no `norm` module.
    """
    norm = getattr(model, "norm", None)
    if not isinstance(norm, torch.nn.Module):
        yield False
        return

    def hook(_module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return (args[0][rows, cols][None], *args[1:])

    handle = norm.register_forward_pre_hook(hook)
    try:
        yield True
    finally:
        handle.remove()


@dataclass
class Request:
    """One prompt: feed `ids`, get the logits at `positions` (each predicts the token after that position)."""

    key: str
    ids: list[int]
    positions: list[int]
    meta: Any = None


@dataclass
class PackedRow:
    """Requests in one row: the first `prefix` tokens (shared by all) once, then each request's ids[prefix:]."""
    prefix: int
    requests: list[Request]

    @property
    def length(self) -> int:
        return self.prefix + sum(len(r.ids) - self.prefix for r in self.requests)


@dataclass
class Batch:
    group: int
    requests: list[Request]
    rows: list[PackedRow] | None = None    # packed rows (then `requests` lists their requests in row order)


@dataclass
class Plan:
    groups: list[list[Request]]
    prefix: list[int]                      # shared prefix length per group (0 = none)
    batches: list[Batch] = field(default_factory=list)


def pack_rows(requests: Sequence[Request], max_len: int = MAX_PACKED_ROW) -> list[PackedRow]:
    """Requests in token order, each joining the row before it while they share at least MIN_PACKED_PREFIX
    leading tokens, at least half of the row's current prefix (a short shared start such as "Question:" does not
    pull unrelated prompts in), and the row stays within max_len tokens."""
    rows: list[PackedRow] = []
    for r in sorted(requests, key=lambda r: (r.ids, r.key)):
        row = rows[-1] if rows else None
        if row is not None:
            shared = min(common_prefix_len([row.requests[0].ids, r.ids]), row.prefix)
            grown = PackedRow(shared, [*row.requests, r])
            if shared >= MIN_PACKED_PREFIX and 2 * shared >= row.prefix and grown.length <= max_len:
                rows[-1] = grown
                continue
        rows.append(PackedRow(len(r.ids), [r]))
    return rows


def plan(groups: Sequence[Sequence[Request]], batch_tokens: int = DEFAULT_BATCH_TOKENS,
         max_rows: int = MAX_ROWS, share_prefix: bool = True, max_prefix: int | None = None,
         cache_rows: Callable[[int], int] | None = None, pack: bool = False) -> Plan:
    """Sort each group's requests by length (longest first) and cut them into batches.

    `cache_rows(length)` caps the rows of a batch that reuses a shared prefix (its KV cache must fit memory).
    pack: a group without a shared KV-cache prefix is packed (`pack_rows`) and its rows cut into batches.
    """
    out = Plan(groups=[list(g) for g in groups], prefix=[])
    for gi, reqs in enumerate(out.groups):
        lcp = common_prefix_len([r.ids for r in reqs]) if share_prefix and reqs else 0
        if reqs:
            lcp = min(lcp, min(min(r.positions) for r in reqs))  # every wanted position must be recomputed
        if max_prefix is not None:
            lcp = min(lcp, max_prefix)
        if lcp < MIN_SHARED_PREFIX:
            lcp = 0
        out.prefix.append(lcp)
        if pack and not lcp:
            packed = sorted(pack_rows(reqs), key=lambda row: (-row.length, row.requests[0].key))
            cuts = [0]
            for i, row in enumerate(packed):  # longest first; a batch ends where padding to its width would waste > 1/5
                width, n = packed[cuts[-1]].length, i - cuts[-1]
                if n and (width * (n + 1) > batch_tokens or n >= max_rows or row.length * 5 < width * 4):
                    cuts.append(i)
            bounds = [*cuts, len(packed)]
            out.batches += [Batch(gi, [r for row in packed[a:b] for r in row.requests], packed[a:b])
                            for a, b in zip(bounds, bounds[1:], strict=False) if b > a]
            continue
        rows_cap = max_rows
        if lcp and cache_rows is not None:
            rows_cap = min(max_rows, cache_rows(max(len(r.ids) for r in reqs)))
        order = sorted(reqs, key=lambda r: (-len(r.ids), r.key))
        cur: list[Request] = []
        width = 0
        for r in order:
            w = max(width, len(r.ids) - lcp)
            if cur and (w * (len(cur) + 1) > batch_tokens or len(cur) >= rows_cap):
                out.batches.append(Batch(gi, cur))
                cur, w = [], len(r.ids) - lcp
            cur.append(r)
            width = w
        if cur:
            out.batches.append(Batch(gi, cur))
    return out


class Runner:
    """Runs planned batches through a model, skipping batches whose every item is already in the store."""

    def __init__(self, llm: Any, store: ResultStore, progress: bool = True, desc: str = "") -> None:
        self.llm = llm
        self.model = llm.model
        self.store = store
        self.progress = progress
        self.desc = desc
        self._cache_shape = (0, 0)
        self.forward_s = 0.0

    # ---------------------------------------------------------------- KV cache for shared prefixes
    def _ensure_cache(self, rows: int, length: int) -> None:
        b, s = self._cache_shape
        b, s = max(b, rows), max(s, length)
        if b > self._cache_rows(s):  # growing rows and length separately would exceed the budget (a cache of
            b, s = rows, length      # the most rows of any group x the longest prompt: ~3 GB at MMLU 5-shot)
        self.model.setup_cache(b, s)  # reallocates only when the shape changes; otherwise just resets
        self._cache_shape = (b, s)

    def _fill_prefix(self, ids: list[int], rows: int) -> None:
        x = torch.tensor([ids], dtype=torch.long)
        self.model(x, 0, use_cache=True, last_only=True)
        n = len(ids)
        for layer in self.model.layers:
            c = layer.self_attn.cache
            if rows > 1:
                c.k[1:rows, :, :n] = c.k[0:1, :, :n]
                c.v[1:rows, :, :n] = c.v[0:1, :, :n]

    def _cache_rows(self, length: int) -> int:
        cfg = self.llm.config
        el = torch.finfo(self.llm.dtype).bits // 8
        per_row = cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * length * el
        return max(1, min(MAX_ROWS, CACHE_BYTES // max(per_row, 1)))

    def plan(self, groups: Sequence[Sequence[Request]], batch_tokens: int = DEFAULT_BATCH_TOKENS,
             share_prefix: bool = True) -> Plan:
        """`plan()` with this model's KV-cache limits (no prefix sharing for sliding-window models) and packed
        rows (not for sliding-window models: a packed row is longer than its prompts, the window would cut it)."""
        window = self.llm.config.sliding_window
        longest = max((len(r.ids) for g in groups for r in g), default=0)
        share = share_prefix and (window is None or longest <= window)  # a rolling cache would evict it
        return plan(groups, batch_tokens, share_prefix=share, cache_rows=self._cache_rows, pack=window is None)

    # ---------------------------------------------------------------- running
    @torch.inference_mode()
    def _run_batch(self, reqs: list[Request], lcp: int) -> list[torch.Tensor]:
        width = max(len(r.ids) for r in reqs) - lcp
        x = torch.zeros(len(reqs), width, dtype=torch.long)
        rows, cols, counts = [], [], []
        for i, r in enumerate(reqs):
            suffix = r.ids[lcp:]
            x[i, :len(suffix)] = torch.tensor(suffix, dtype=torch.long)
            rows += [i] * len(r.positions)
            cols += [p - lcp for p in r.positions]
            counts.append(len(r.positions))
        rows_t, cols_t = torch.tensor(rows), torch.tensor(cols)
        with select_positions(self.model, rows_t, cols_t) as hooked:
            logits = self.model(x, lcp, use_cache=lcp > 0)
        picked = logits[0] if hooked else logits[rows_t, cols_t]
        return list(picked.float().split(counts))

    @torch.inference_mode()
    def _run_packed(self, rows: list[PackedRow]) -> list[torch.Tensor]:
        """One forward over packed rows (right-padded; a pad token sees the prefix and itself) -> the logits at
        each request's positions, requests in row order."""
        width = max(row.length for row in rows)
        B = len(rows)
        x = torch.zeros(B, width, dtype=torch.long)
        pos = torch.zeros(B, width, dtype=torch.long)
        lo = torch.arange(width).repeat(B, 1)                      # (B, W): pads see only the prefix and themselves
        shared = torch.tensor([row.prefix for row in rows])
        sel_rows, sel_cols, counts = [], [], []
        for b, row in enumerate(rows):
            P = row.prefix
            x[b, :P] = torch.tensor(row.requests[0].ids[:P])
            pos[b, :P] = torch.arange(P)
            lo[b, :P] = 0
            col = P
            for r in row.requests:
                n = len(r.ids) - P
                x[b, col:col + n] = torch.tensor(r.ids[P:], dtype=torch.long)
                pos[b, col:col + n] = torch.arange(P, P + n)
                lo[b, col:col + n] = col
                sel_rows += [b] * len(r.positions)
                sel_cols += [p if p < P else col + p - P for p in r.positions]
                counts.append(len(r.positions))
                col += n
        rows_t, cols_t = torch.tensor(sel_rows), torch.tensor(sel_cols)
        with select_positions(self.model, rows_t, cols_t) as hooked:
            logits = self.model(x, packed=Packed(pos, lo, shared))
        picked = logits[0] if hooked else logits[rows_t, cols_t]
        return list(picked.float().split(counts))

    def run(self, p: Plan, finish: Callable[[Request, torch.Tensor], Any]) -> dict[str, Any]:
        """Compute every request not yet in the store; `finish(request, logits (P, V) fp32)` gives the value
        to store. Returns {key: value} for all requests of the plan."""
        from tqdm import tqdm

        total = sum(len(b.requests) for b in p.batches)
        todo = [b for b in p.batches if not all(r.key in self.store for r in b.requests)]
        done_before = total - sum(len(b.requests) for b in todo)
        bar = tqdm(total=total, initial=done_before, desc=self.desc, unit="item", disable=not self.progress,
                   dynamic_ncols=True, leave=False)
        ready_group = -1
        shared = [b for b in todo if p.prefix[b.group]]
        if shared:  # one KV-cache allocation for the run when it fits the budget (growing re-zeroes it each time)
            rows = max(len(b.requests) for b in shared)
            length = max(len(r.ids) for b in shared for r in p.groups[b.group])
            if rows <= self._cache_rows(length):
                self._ensure_cache(rows, length)
        try:
            for b in todo:
                lcp = p.prefix[b.group]
                t0 = time.perf_counter()
                if lcp and ready_group != b.group:
                    rows = max(len(bb.requests) for bb in p.batches if bb.group == b.group)
                    longest = max(len(r.ids) for r in p.groups[b.group])
                    self._ensure_cache(rows, longest)
                    with torch.inference_mode():
                        self._fill_prefix(p.groups[b.group][0].ids[:lcp], rows)
                    ready_group = b.group
                outs = self._run_packed(b.rows) if b.rows is not None else self._run_batch(b.requests, lcp)
                self.forward_s += time.perf_counter() - t0
                self.store.put_many((r.key, finish(r, o)) for r, o in zip(b.requests, outs, strict=True))
                bar.update(len(b.requests))
        finally:
            bar.close()
        return {r.key: self.store.get(r.key) for g in p.groups for r in g}


def token_logprobs(logits: torch.Tensor, targets: Sequence[int]) -> torch.Tensor:
    """log p(target_i) from fp32 logits (N, V)."""
    t = torch.as_tensor(list(targets), dtype=torch.long)
    return F.log_softmax(logits, dim=-1).gather(-1, t[:, None])[:, 0]
