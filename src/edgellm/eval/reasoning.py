"""Multiple-choice reasoning tasks (ARC-e/c, PIQA, HellaSwag, CommonsenseQA, BoolQ, WinoGrande), two ways:

mc  the seeds' lettered prompt: "The following are multiple choice questions (with answers) about common
    sense reasoning.\\n\\n" + k shots ("<question>\\nA. ..\\nB. ..\\nAnswer: X\\n\\n") + the question ending in
    "\\nAnswer:"; the prediction is the answer letter with the highest next-token logit (`acc`), and
    `acc_argmax` compares the decoded argmax over the whole vocabulary with the letter.
ll  lm-evaluation-harness's log-likelihood scoring: the sum of log p(continuation tokens | context) per
    choice; `acc` takes the highest, `acc_norm` the highest per character of the choice. Contexts are
    "Question: <q>\\nAnswer:" (ARC, PIQA, CommonsenseQA), "<activity>: <ctx>" (HellaSwag),
    "<passage>\\nQuestion: <q>?\\nAnswer:" with " no"/" yes" (BoolQ), and the sentence up to the blank with
    each option filled in, scoring the rest of the sentence (WinoGrande, partial scoring). Shots are
    "<context><gold continuation>\\n\\n".

Shots come from the ARC dev splits; the other tasks only have the evaluated split, so an item's shots are
the first k items of that split other than itself.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import InvalidArgumentError
from .cache import ResultStore, item_key
from .data import REASONING_TASKS, TASK_ALIASES, MCItem, load_task
from .engine import DEFAULT_BATCH_TOKENS, Request, Runner, model_fingerprint, token_logprobs
from .mmlu import continuation_token

MC_HEADER = "The following are multiple choice questions (with answers) about common sense reasoning.\n\n"
LETTERS = "ABCDEFGH"
MODES = ("mc", "ll")


def mc_query(item: MCItem) -> str:
    lines = "".join(f"\n{LETTERS[i]}. {c}" for i, c in enumerate(item.choices))
    return f"{item.question}{lines}\nAnswer:"


def mc_prompt(item: MCItem, shots: list[MCItem]) -> str:
    body = "".join(f"{mc_query(s)} {LETTERS[s.gold]}\n\n" for s in shots)
    return MC_HEADER + body + mc_query(item)


def ll_fewshot(shots: list[MCItem]) -> str:
    return "".join(f"{s.contexts[s.gold]}{s.continuations[s.gold]}\n\n" for s in shots)


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-evaluation-harness `_encode_pair`: trailing spaces of the context move to the continuation; the
    continuation's tokens are those of context+continuation after the context's own tokens."""
    n = len(context) - len(context.rstrip())
    if n:
        continuation, context = context[-n:] + continuation, context[:-n]
    ctx = tokenizer.encode(context)
    whole = tokenizer.encode(context + continuation)
    cont = whole[len(ctx):]
    if not cont:
        cont = tokenizer.encode(continuation, add_bos=False)
    return ctx, cont


def choice_chars(continuation: str) -> int:
    """acc_norm's length: lm-eval divides by the choice's characters, without the " " it is scored after."""
    return len(continuation) - 1 if continuation.startswith(" ") else len(continuation)


def shots_for(index: int, items: list[MCItem], pool: list[MCItem] | None, k: int) -> tuple[str, list[MCItem]]:
    if k == 0:
        return "", []
    if pool is not None:
        return "dev", pool[:k]
    chosen = [j for j in range(min(len(items), k + 1)) if j != index][:k]
    return ",".join(map(str, chosen)), [items[j] for j in chosen]


@dataclass
class TaskResult:
    task: str
    model: str
    dtype: str
    shot: int
    items: int
    metrics: dict[str, float]        # mc_acc, mc_acc_argmax, ll_acc, ll_acc_norm (those computed)
    wall_s: float
    forward_s: float
    cpu_s: float = 0.0    # CPU time of all threads (process_time)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def evaluate_task(llm: Any, task: str, *, shot: int = 0, modes: tuple[str, ...] = MODES,
                  limit: int | None = None, data_dir: str | Path | None = None,
                  store: ResultStore | None = None, batch_tokens: int = DEFAULT_BATCH_TOKENS,
                  progress: bool = True, model_name: str = "") -> TaskResult:
    task = TASK_ALIASES.get(task, task)
    if task not in REASONING_TASKS:
        raise InvalidArgumentError(f"unknown task {task!r}; choose from {', '.join(REASONING_TASKS)}")
    if shot < 0:
        raise InvalidArgumentError("--shot must be >= 0")
    if limit is not None and limit < 1:
        raise InvalidArgumentError("--limit must be >= 1")
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise InvalidArgumentError(f"unknown mode(s) {bad}; choose from {', '.join(MODES)}")
    t0, c0 = time.perf_counter(), time.process_time()
    items, pool = load_task(task, data_dir)
    if limit is not None:
        items = items[:limit]
    tok = llm.tokenizer
    fp = model_fingerprint(llm)
    store = store if store is not None else ResultStore(None, "reasoning")
    runner = Runner(llm, store, progress=progress)
    metrics: dict[str, float] = {}
    maxlen = llm.config.max_seq_len

    if "mc" in modes:
        n_letters = max(len(it.choices) for it in items)
        letters = [continuation_token(tok, "Answer:", f" {LETTERS[i]}") for i in range(n_letters)]
        groups: dict[str, list[Request]] = defaultdict(list)
        prompts, tags = [], []
        for i, it in enumerate(items):
            tag, shots = shots_for(i, items, pool, shot)
            prompts.append(mc_prompt(it, shots))
            tags.append(tag)
        for i, (ids, tag) in enumerate(zip(tok.encode_batch(prompts), tags, strict=True)):
            ids = ids[-maxlen:]
            key = item_key("mc", fp, letters, ids)
            groups[tag].append(Request(key, ids, [len(ids) - 1], meta=i))
        runner.desc = f"{task} mc"

        def finish_mc(_req: Request, logits: torch.Tensor) -> dict[str, Any]:
            row = logits[-1]
            top = int(row.argmax())
            return {"scores": [float(row[t]) for t in letters], "argmax_text": tok.decode([top])}

        values = runner.run(runner.plan(list(groups.values()), batch_tokens), finish_mc)
        correct = correct_argmax = 0
        for g in groups.values():
            for r in g:
                it, v = items[r.meta], values[r.key]
                scores = v["scores"][: len(it.choices)]
                correct += int(max(range(len(scores)), key=scores.__getitem__) == it.gold)
                correct_argmax += int(v["argmax_text"].strip() == LETTERS[it.gold])
        metrics["mc_acc"] = correct / len(items)
        metrics["mc_acc_argmax"] = correct_argmax / len(items)

    if "ll" in modes:
        groups = defaultdict(list)
        for i, it in enumerate(items):
            tag, shots = shots_for(i, items, pool, shot)
            prefix = ll_fewshot(shots)
            for c, (ctx_text, cont_text) in enumerate(zip(it.contexts, it.continuations, strict=True)):
                ctx, cont = encode_pair(tok, prefix + ctx_text, cont_text)
                ids = (ctx + cont)[:-1]
                if len(ids) > maxlen:
                    cut = len(ids) - maxlen
                    ids, ctx = ids[cut:], ctx[cut:]
                positions = list(range(len(ctx) - 1, len(ctx) - 1 + len(cont)))
                key = item_key("ll", fp, ids, cont)
                groups[tag].append(Request(key, ids, positions, meta=(i, c, cont)))
        runner.desc = f"{task} ll"

        def finish_ll(req: Request, logits: torch.Tensor) -> dict[str, Any]:
            cont = req.meta[2]
            lp = token_logprobs(logits, cont)
            greedy = bool((logits.argmax(-1) == torch.tensor(cont)).all())
            return {"ll": float(lp.sum()), "greedy": greedy}

        values = runner.run(runner.plan(list(groups.values()), batch_tokens), finish_ll)
        lls: dict[int, dict[int, float]] = defaultdict(dict)
        for g in groups.values():
            for r in g:
                i, c, _ = r.meta
                lls[i][c] = values[r.key]["ll"]
        acc = acc_norm = 0
        for i, it in enumerate(items):
            ll = [lls[i][c] for c in range(len(it.choices))]
            norm = [v / max(choice_chars(it.continuations[c]), 1) for c, v in enumerate(ll)]
            acc += int(max(range(len(ll)), key=ll.__getitem__) == it.gold)
            acc_norm += int(max(range(len(norm)), key=norm.__getitem__) == it.gold)
        metrics["ll_acc"] = acc / len(items)
        metrics["ll_acc_norm"] = acc_norm / len(items)

    return TaskResult(task=task, model=model_name or fp["path"], dtype=fp["dtype"], shot=shot, items=len(items),
                      metrics=metrics, wall_s=time.perf_counter() - t0, forward_s=runner.forward_s,
                      cpu_s=time.process_time() - c0)
