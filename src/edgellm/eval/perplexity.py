"""Perplexity over non-overlapping windows of a tokenized corpus.

Protocols:
  gptq      the GPTQ/AWQ recipe: the corpus is tokenized once (BOS as the model's tokenizer adds it), cut into
            non-overlapping windows of `seqlen` tokens (the tail is dropped) and every window scores its
            seqlen-1 next-token predictions. PPL = exp(mean NLL over all predicted tokens).
  llamacpp  as llama.cpp's llama-perplexity: the raw file, windows of `seqlen` whose first token is replaced by
            BOS when the model uses one, and only the second half of each window is scored (tokens
            seqlen/2+1 .. seqlen-1, each seeing at least seqlen/2 tokens of context).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import ContextLengthError, InvalidArgumentError
from ..model import Transformer
from .cache import ResultStore, item_key
from .engine import DEFAULT_BATCH_TOKENS, model_fingerprint

PROTOCOLS = ("gptq", "llamacpp")


@dataclass
class PerplexityResult:
    model: str
    dtype: str
    data: str
    source: str
    protocol: str
    seqlen: int
    ppl: float
    nll: float            # mean NLL per scored token
    windows: int
    tokens_scored: int
    corpus_tokens: int
    wall_s: float
    forward_s: float
    cpu_s: float = 0.0    # CPU time of all threads (process_time), for comparing under load

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def make_windows(ids: list[int], seqlen: int, protocol: str, bos_id: int | None) -> torch.Tensor:
    """(n, seqlen) windows; llamacpp puts BOS in front of each window when the model uses one."""
    n = len(ids) // seqlen
    if n == 0:
        raise InvalidArgumentError(f"the corpus has {len(ids)} tokens, fewer than one window of {seqlen}")
    w = torch.tensor(ids[: n * seqlen], dtype=torch.long).view(n, seqlen).clone()
    if protocol == "llamacpp" and bos_id is not None:
        w[:, 0] = bos_id
    return w


def first_scored(seqlen: int, protocol: str) -> int:
    """Index of the first logit row that is scored (it predicts the token right after it)."""
    return seqlen // 2 if protocol == "llamacpp" else 0


CE_ROWS = 512  # logit rows per lm_head + cross-entropy chunk (a 2048-token window's fp32 logits are 400 MB)


@torch.inference_mode()
def window_nlls(model: Transformer, windows: torch.Tensor, first: int) -> list[tuple[float, int]]:
    """(sum of NLL, count) per window, scoring logit rows first..T-2 against tokens first+1..T-1.

    lm_head and the fp32 cross-entropy run CE_ROWS rows at a time: less memory traffic than whole-window logits."""
    B, T = windows.shape
    h = model(windows, hidden_only=True)                                # (B, T, C)
    out = []
    for b in range(B):
        hb, target = h[b, first:T - 1], windows[b, first + 1:]
        nll = math.fsum(float(F.cross_entropy(model.lm_head(hb[i:i + CE_ROWS]).float(), target[i:i + CE_ROWS],
                                              reduction="sum")) for i in range(0, T - 1 - first, CE_ROWS))
        out.append((nll, T - 1 - first))
    return out


def evaluate_perplexity(llm: Any, ids: list[int], seqlen: int, *, protocol: str = "gptq",
                        nsamples: int | None = None, store: ResultStore | None = None,
                        batch_tokens: int = DEFAULT_BATCH_TOKENS, progress: bool = True,
                        data: str = "", source: str = "", model_name: str = "") -> PerplexityResult:
    """Perplexity of `llm` over the token ids of a corpus. Finished windows are kept in `store` and skipped
    when the same run is started again."""
    from tqdm import tqdm

    if protocol not in PROTOCOLS:
        raise InvalidArgumentError(f"unknown protocol {protocol!r}; choose from {', '.join(PROTOCOLS)}")
    if seqlen < 2 or (protocol == "llamacpp" and seqlen < 4):
        raise InvalidArgumentError(f"--seqlen must be at least {4 if protocol == 'llamacpp' else 2}")
    if seqlen > llm.config.max_seq_len:
        raise ContextLengthError(f"--seqlen {seqlen} exceeds the model's context of {llm.config.max_seq_len}")
    if nsamples is not None and nsamples < 1:
        raise InvalidArgumentError("--nsamples must be >= 1")
    store = store if store is not None else ResultStore(None, "ppl")
    t0, c0 = time.perf_counter(), time.process_time()
    bos = llm.tokenizer.bos_id if llm.tokenizer.add_bos else None
    windows = make_windows(ids, seqlen, protocol, bos)
    if nsamples is not None:
        windows = windows[:nsamples]
    n = windows.shape[0]
    first = first_scored(seqlen, protocol)
    fp = model_fingerprint(llm)
    keys = [item_key("ppl", fp, protocol, windows[i].tolist()) for i in range(n)]
    per_batch = max(1, batch_tokens // seqlen)
    batches = [list(range(s, min(n, s + per_batch))) for s in range(0, n, per_batch)]
    todo = [b for b in batches if not all(keys[i] in store for i in b)]
    done = n - sum(len(b) for b in todo)
    forward_s = 0.0
    bar = tqdm(total=n, initial=done, desc=f"{data or 'ppl'} {seqlen}", unit="win", disable=not progress,
               dynamic_ncols=True, leave=False)
    try:
        for b in todo:
            t1 = time.perf_counter()
            res = window_nlls(llm.model, windows[b], first)
            forward_s += time.perf_counter() - t1
            store.put_many((keys[i], {"nll": nll, "n": cnt}) for i, (nll, cnt) in zip(b, res, strict=True))
            running = [store.get(k) for k in keys if k in store]
            bar.set_postfix(ppl=f"{math.exp(sum(r['nll'] for r in running) / sum(r['n'] for r in running)):.3f}")
            bar.update(len(b))
    finally:
        bar.close()
    vals = [store.get(k) for k in keys]
    total_nll = math.fsum(v["nll"] for v in vals)
    count = sum(v["n"] for v in vals)
    mean = total_nll / count
    return PerplexityResult(model=model_name or fp["path"], dtype=fp["dtype"], data=data, source=source,
                            protocol=protocol, seqlen=seqlen, ppl=math.exp(mean), nll=mean, windows=n,
                            tokens_scored=count, corpus_tokens=len(ids), wall_s=time.perf_counter() - t0,
                            forward_s=forward_s, cpu_s=time.process_time() - c0)
