"""Text embeddings: the final-normed hidden states, mean- or last-token-pooled, L2-normalised.

`edgellm embed TEXT...` prints the vectors, `edgellm similarity TEXT...` their cosine-similarity matrix; the
server's /v1/embeddings uses `tokenize_texts` + `embed_ids` (and `to_base64` for encoding_format="base64").
"""

from __future__ import annotations

import argparse
import array
import base64
import json
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from .errors import ContextLengthError, InvalidArgumentError

if TYPE_CHECKING:
    from .api import LLM
    from .model import Transformer

POOLINGS = ("mean", "last")
MAX_BATCH_TOKENS = 8192  # padded tokens per forward pass (bounds the activations of long inputs)


def embed_ids(model: Transformer, batch_ids: Sequence[Sequence[int]], pooling: str = "mean",
              normalize: bool = True, batch_size: int = 16) -> torch.Tensor:
    """float32 embeddings (N, C) of N token-id sequences, rows in input order.

    Sequences are sorted by length and run `batch_size` at a time, RIGHT-padded and without a mask: attention
    is causal, so a real token never sees the pads after it: the real positions' hidden states do not depend on
    the pads and equal the unpadded sequence's up to fp32 rounding (other GEMM / attention-kernel shapes;
    tests/test_embed.py checks both), so equal-length grouping is not needed. Pooling reads real positions only.
    With quantized weights (GGUF blocks under dtype "auto") the linear layers pick their kernel by row count,
    so a text's vector can differ slightly (cosine ~0.9995) between batches."""
    if pooling not in POOLINGS:
        raise InvalidArgumentError(f"pooling must be one of {', '.join(POOLINGS)} (got {pooling!r})")
    if batch_size < 1:
        raise InvalidArgumentError(f"batch_size must be >= 1 (got {batch_size})")
    lengths = [len(s) for s in batch_ids]
    if not lengths or min(lengths) == 0:
        raise InvalidArgumentError("embeddings need at least one sequence, each of at least one token")
    out = torch.empty(len(lengths), model.config.hidden_size, dtype=torch.float32)
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    with torch.inference_mode():
        i = 0
        while i < len(order):
            j = i + 1  # grow the batch while it fits (sorted: the newest sequence is the longest)
            while j < len(order) and j - i < batch_size and (j + 1 - i) * lengths[order[j]] <= MAX_BATCH_TOKENS:
                j += 1
            rows = order[i:j]
            lens = torch.tensor([lengths[r] for r in rows])
            ids = torch.zeros(len(rows), int(lens[-1]), dtype=torch.long)  # pad id 0: never pooled
            for b, r in enumerate(rows):
                ids[b, :lengths[r]] = torch.as_tensor(batch_ids[r], dtype=torch.long)
            h = model(ids, hidden_only=True).float()                   # (B, T, C)
            if pooling == "mean":
                real = torch.arange(ids.shape[1])[None, :] < lens[:, None]  # (B, T)
                pooled = (h * real[..., None]).sum(1) / lens[:, None]
            else:
                pooled = h[torch.arange(len(rows)), lens - 1]
            out[rows] = pooled
            i = j
    return F.normalize(out, dim=-1) if normalize else out


def tokenize_texts(llm: LLM, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text (the tokenizer's default BOS handling); one-line errors for bad input. A text
    longer than the context is an error, never truncated."""
    if isinstance(texts, str | bytes) or not isinstance(texts, Sequence) or not texts:
        raise InvalidArgumentError("input must be a non-empty list of strings")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise InvalidArgumentError(f"input {i} is {type(t).__name__}, not a string")
        if not t:
            raise InvalidArgumentError(f"input {i} is an empty string")
    batch = llm.tokenizer.encode_batch(list(texts))
    limit = llm.config.max_seq_len
    for i, ids in enumerate(batch):
        if len(ids) > limit:
            raise ContextLengthError(f"input {i} has {len(ids)} tokens, more than the model's context of "
                                     f"{limit} tokens (shorten or split it; embeddings never truncate)")
    return batch


def embed_texts(llm: LLM, texts: Sequence[str], pooling: str = "mean", normalize: bool = True,
                batch_size: int = 16) -> torch.Tensor:
    """float32 embeddings (N, hidden_size) of N texts, L2-normalised unless normalize=False."""
    return embed_ids(llm.model, tokenize_texts(llm, texts), pooling, normalize, batch_size)


def to_base64(vec: torch.Tensor) -> str:
    """A 1-D vector as base64 of its little-endian float32 bytes (OpenAI's encoding_format="base64")."""
    if vec.ndim != 1:
        raise InvalidArgumentError(f"to_base64 takes a 1-D vector (got shape {tuple(vec.shape)})")
    buf = array.array("f", vec.detach().float().cpu().tolist())
    if sys.byteorder == "big":
        buf.byteswap()
    return base64.b64encode(buf.tobytes()).decode("ascii")


def cosine_matrix(emb: torch.Tensor) -> torch.Tensor:
    """(N, N) cosine similarities of the rows of emb (N, C)."""
    unit = F.normalize(emb.float(), dim=-1)
    return (unit @ unit.T).clamp_(-1.0, 1.0)


# ---------------------------------------------------------------------------------------------- CLI
def short(text: str, width: int = 24) -> str:
    """One line of at most `width` characters (an ellipsis marks a cut)."""
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 1] + "…"


def similarity_table(texts: Sequence[str], sim: torch.Tensor) -> str:
    from .report import markdown_table

    labels = [f"{i}: {short(t)}" for i, t in enumerate(texts)]
    values = [[f"{v:.4f}" for v in row] for row in sim.tolist()]
    widths = [max(len(labels[j]), *(len(row[j]) for row in values)) for j in range(len(texts))]
    rows = [[labels[i]] + [v.rjust(w) for v, w in zip(row, widths, strict=True)] for i, row in enumerate(values)]
    return markdown_table(["text"] + labels, rows)


def _texts(args: argparse.Namespace) -> list[str]:
    if args.text:
        return list(args.text)
    texts = [line.rstrip("\r\n") for line in sys.stdin]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise InvalidArgumentError("no texts: give them as arguments or one per line on stdin")
    return texts


def _load(args: argparse.Namespace) -> LLM:
    from .cli import load_from_args

    if args.batch_size < 1:
        raise InvalidArgumentError(f"--batch-size must be >= 1 (got {args.batch_size})")
    return load_from_args(args)


def _model_name(llm: LLM) -> str:
    return llm.loaded.path.name if llm.loaded.source == "default" else llm.loaded.source


def cmd_embed(args: argparse.Namespace) -> int:
    texts = _texts(args)
    llm = _load(args)
    ids = tokenize_texts(llm, texts)
    emb = embed_ids(llm.model, ids, args.pooling, not args.no_normalize, args.batch_size)
    if args.json:
        data = [{"index": i, "text": t, "tokens": len(x), "embedding": e}
                for i, (t, x, e) in enumerate(zip(texts, ids, emb.tolist(), strict=True))]
        print(json.dumps({"model": _model_name(llm), "pooling": args.pooling, "normalized": not args.no_normalize,
                          "dim": emb.shape[1], "data": data}, ensure_ascii=False))
        return 0
    for i, (t, x, e) in enumerate(zip(texts, ids, emb, strict=True)):
        head = ", ".join(f"{v:+.4f}" for v in e[:6].tolist())
        print(f"{i:>3}  {len(x):>5} tokens  dim {emb.shape[1]}  [{head}, ...]  {short(t, 40)}")
    return 0


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise InvalidArgumentError("--plot needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_similarity(plt: Any, texts: Sequence[str], sim: torch.Tensor, path: str) -> None:
    n = len(texts)
    labels = [f"{i}: {short(t)}" for i, t in enumerate(texts)]
    fig, ax = plt.subplots(figsize=(2.5 + 0.6 * n, 1.5 + 0.5 * n))
    vmin = min(0.0, float(sim.min()))
    im = ax.imshow(sim.tolist(), cmap="viridis", vmin=vmin, vmax=1.0)
    ax.set_xticks(range(n), labels, rotation=45, ha="right")
    ax.set_yticks(range(n), labels)
    if n <= 16:
        for i in range(n):
            for j in range(n):
                v = float(sim[i, j])
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8,
                        color="black" if (v - vmin) / (1.0 - vmin) > 0.6 else "white")
    fig.colorbar(im, ax=ax, label="cosine similarity")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def cmd_similarity(args: argparse.Namespace) -> int:
    plt = _pyplot() if args.plot else None  # a missing matplotlib fails before the model loads
    texts = _texts(args)
    llm = _load(args)
    sim = cosine_matrix(embed_texts(llm, texts, args.pooling, batch_size=args.batch_size))
    if args.json:
        print(json.dumps({"model": _model_name(llm), "pooling": args.pooling, "texts": texts,
                          "matrix": sim.tolist()}, ensure_ascii=False))
    else:
        print(similarity_table(texts, sim))
    if plt is not None:
        plot_similarity(plt, texts, sim, args.plot)
        if not args.json:
            print(f"wrote {args.plot}", file=sys.stderr)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from .cli import add_model_args

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("text", nargs="*", help="texts to embed (none: one per non-empty line of stdin)")
        add_model_args(p)
        p.add_argument("--pooling", default="mean", choices=POOLINGS,
                       help="mean of all tokens' final hidden states (default) or the last token's")
        p.add_argument("--batch-size", type=int, default=16, help="texts per forward pass (default 16)")
        p.add_argument("--json", action="store_true", help="print one JSON object")

    p = sub.add_parser("embed", help="text embeddings (pooled final hidden states, L2-normalised)")
    common(p)
    p.add_argument("--no-normalize", action="store_true", help="keep the pooled vectors' lengths")
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("similarity", help="cosine-similarity matrix of texts' embeddings (table, --plot PNG)")
    common(p)
    p.add_argument("--plot", default=None, metavar="PNG", help="also save a heat map (needs matplotlib)")
    p.set_defaults(func=cmd_similarity)
