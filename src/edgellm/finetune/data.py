"""Training data: alpaca JSON/JSONL, chat JSONL (`messages`), plain text; tokenized with loss masks.

Every example is (ids, labels) with labels[i] = ids[i] where the loss counts and -100 elsewhere (HF's
convention: unshifted; the loss predicts ids[i] from positions < i). Chat data counts assistant tokens only:
for each assistant message, the characters from the end of the template's generation prompt to the end of
that message's rendering (its content and end-of-turn marker), the span TRL's assistant-only loss marks with
`{% generation %}` in a training template. A malformed record raises one line naming file, line and field.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import DataFormatError, TokenizerError
from ..tokenizer import Tokenizer

IGNORE = -100
FORMATS = ("alpaca", "chat", "text")
ALPACA_PROMPT = ("Below is an instruction that describes a task{ctx}. Write a response that appropriately "
                 "completes the request.\n\n### Instruction:\n{instruction}\n\n{input}### Response:\n")


@dataclass
class Example:
    ids: list[int]
    labels: list[int]


# ---------------------------------------------------------------------------------------------- reading
def read_records(path: str | Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed record) from a JSON array file or a JSONL file."""
    p = Path(path)
    if not p.is_file():
        raise DataFormatError(f"{p}: data file not found")
    text = p.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataFormatError(f"{p}:{e.lineno}: invalid JSON ({e.msg})") from None
        for i, item in enumerate(items):
            yield i + 1, item  # position in the array stands in for the line
        return
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as e:
            raise DataFormatError(f"{p}:{n}: invalid JSON ({e.msg})") from None


def _field(rec: Any, name: str, where: str, required: bool = True) -> str:
    if not isinstance(rec, dict):
        raise DataFormatError(f"{where}: record is {type(rec).__name__}, expected an object")
    v = rec.get(name)
    if v is None and not required:
        return ""
    if not isinstance(v, str) or (required and not v.strip()):
        raise DataFormatError(f"{where}: field {name!r} " + ("missing" if v is None else "must be a non-empty string"))
    return v


def _messages(rec: Any, where: str) -> list[dict[str, str]]:
    msgs = rec.get("messages") if isinstance(rec, dict) else None
    if not isinstance(msgs, list) or not msgs:
        raise DataFormatError(f"{where}: field 'messages' must be a non-empty list")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "tool"):
            raise DataFormatError(f"{where}: field 'messages[{i}].role' must be system, user, assistant or tool")
        if not isinstance(m.get("content"), str):
            raise DataFormatError(f"{where}: field 'messages[{i}].content' must be a string")
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" for m in out):
        raise DataFormatError(f"{where}: field 'messages' has no assistant message (nothing to learn)")
    return out


# ---------------------------------------------------------------------------------------------- tokenizing
def chat_example(tok: Tokenizer, messages: list[dict[str, str]]) -> Example:
    """Render with the checkpoint's template; labels on the assistant turns only (see the module docstring)."""
    text = tok.apply_chat_template(messages, add_generation_prompt=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        head = tok.apply_chat_template(messages[:i], add_generation_prompt=True) if i else ""
        full = tok.apply_chat_template(messages[:i + 1], add_generation_prompt=False)
        if not text.startswith(full) or not full.startswith(head):
            raise TokenizerError("the chat template does not render conversations prefix by prefix; "
                                 "assistant-only masking needs that")
        spans.append((len(head), len(full)))
    enc = tok.backend.encode(text, add_special_tokens=False)
    ids, offsets = list(enc.ids), list(enc.offsets)
    labels = [IGNORE] * len(ids)
    for s, e in spans:  # transformers' rule: from the token holding char s to the token holding char e - 1
        first = next((j for j, (a, b) in enumerate(offsets) if a <= s < b), None)
        last = next((j for j, (a, b) in enumerate(offsets) if a <= e - 1 < b), None)
        if first is None or last is None:
            continue
        for j in range(first, last + 1):
            labels[j] = ids[j]
    full_ids = tok._with_bos(text, ids, None)
    if len(full_ids) > len(ids):
        labels = [IGNORE] + labels
    return Example(full_ids, labels)


def alpaca_example(tok: Tokenizer, instruction: str, inp: str, output: str) -> Example:
    """With a chat template: user = instruction (+ input), assistant = output. Without: the Alpaca prompt."""
    if tok.chat_template:
        user = instruction + (f"\n\n{inp}" if inp else "")
        return chat_example(tok, [{"role": "user", "content": user}, {"role": "assistant", "content": output}])
    prompt = ALPACA_PROMPT.format(ctx=", paired with an input that provides further context" if inp else "",
                                  instruction=instruction, input=f"### Input:\n{inp}\n\n" if inp else "")
    p = tok.encode(prompt)
    o = tok.encode(output, add_bos=False) + tok.eos_ids[:1]
    return Example(p + o, [IGNORE] * len(p) + o)


def load_examples(path: str | Path, fmt: str, tok: Tokenizer, seqlen: int, pack: bool = False) -> list[Example]:
    """Read, validate and tokenize a data file; examples are cut to `seqlen` tokens (or packed into them)."""
    if fmt not in FORMATS:
        raise DataFormatError(f"unknown data format {fmt!r}; choose from {', '.join(FORMATS)}")
    p = Path(path)
    if fmt == "text" and p.suffix not in (".json", ".jsonl"):
        if not p.is_file():
            raise DataFormatError(f"{p}: data file not found")
        ids = tok.encode(p.read_text(encoding="utf-8"))
        exs = [Example(ids, list(ids))]
        pack = True
    else:
        exs = []
        for n, rec in read_records(p):
            where = f"{p}:{n}"
            if fmt == "alpaca":
                exs.append(alpaca_example(tok, _field(rec, "instruction", where), _field(rec, "input", where, False),
                                          _field(rec, "output", where)))
            elif fmt == "chat":
                exs.append(chat_example(tok, _messages(rec, where)))
            else:
                ids = tok.encode(_field(rec, "text", where)) + (tok.eos_ids[:1] if pack else [])
                exs.append(Example(ids, list(ids)))
    if not exs:
        raise DataFormatError(f"{p}: no records")
    if pack:
        return pack_examples(exs, seqlen)
    out = [Example(e.ids[:seqlen], e.labels[:seqlen]) for e in exs]
    return [e for e in out if any(t != IGNORE for t in e.labels[1:])]


def pack_examples(exs: list[Example], seqlen: int) -> list[Example]:
    """Concatenate every example and cut the stream into windows of `seqlen` tokens (the last may be shorter)."""
    ids = [t for e in exs for t in e.ids]
    labels = [t for e in exs for t in e.labels]
    out = [Example(ids[i:i + seqlen], labels[i:i + seqlen]) for i in range(0, len(ids), seqlen)]
    return [e for e in out if len(e.ids) > 1 and any(t != IGNORE for t in e.labels[1:])]


# ---------------------------------------------------------------------------------------------- batching
def collate(exs: list[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (ids, labels) tensors (B, T); padding is never attended to by earlier tokens (causal)."""
    T = max(len(e.ids) for e in exs)
    ids = torch.full((len(exs), T), pad_id, dtype=torch.long)
    labels = torch.full((len(exs), T), IGNORE, dtype=torch.long)
    for i, e in enumerate(exs):
        ids[i, :len(e.ids)] = torch.tensor(e.ids)
        labels[i, :len(e.labels)] = torch.tensor(e.labels)
    return ids, labels


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The shuffled example order of one epoch: a pure function of (seed, epoch), so resuming needs no state."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def micro_batch(exs: list[Example], batch: int, seed: int, k: int) -> list[Example]:
    """Micro-batch number k of the whole run (epochs follow each other; each epoch ends with a short batch)."""
    per_epoch = -(-len(exs) // batch)
    epoch, j = divmod(k, per_epoch)
    order = epoch_order(len(exs), seed, epoch)
    return [exs[i] for i in order[j * batch:(j + 1) * batch]]
