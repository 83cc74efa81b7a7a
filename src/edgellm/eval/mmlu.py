"""MMLU (Hendrycks et al.) with the original prompt of hendrycks/test `evaluate.py`, byte for byte:

    "The following are multiple choice questions (with answers) about" + " " + subject words joined by " "
    + ".\\n\\n", then each shot as "<question>\\nA. <a>\\nB. <b>\\nC. <c>\\nD. <d>\\nAnswer: <X>\\n\\n", then
    the question the same way ending in "\\nAnswer:".

(`format_subject` prefixes every word with a space, so the header reads "about  abstract algebra." with two
spaces, as in the original.) Shots are the first k rows of the dev split; while the tokenized prompt is
longer than `maxlen`, shots are dropped one at a time from the end. A prompt still too long with 0 shots
keeps its last `maxlen` tokens.

Scoring: `logits` compares the next-token logits of " A", " B", " C", " D" (the single token each letter
continuation starts with, as lm-evaluation-harness scores them); `argmax` decodes the argmax over the whole
vocabulary and compares the stripped text with the letter (the seeds' transformerx examples). Both are
computed from the same forward pass and cached together.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import InvalidArgumentError
from .cache import ResultStore, item_key
from .data import MMLU_CATEGORIES, SUBJECT_CATEGORY, MMLUQuestion, mmlu_dir, mmlu_subjects, read_mmlu_csv
from .engine import DEFAULT_BATCH_TOKENS, Request, Runner, model_fingerprint

LETTERS = ["A", "B", "C", "D"]
SCORINGS = ("logits", "argmax")


def format_subject(subject: str) -> str:
    return "".join(" " + entry for entry in subject.split("_"))


def format_example(q: MMLUQuestion, include_answer: bool = True) -> str:
    prompt = q.question
    for letter, choice in zip(LETTERS, q.choices, strict=True):
        prompt += f"\n{letter}. {choice}"
    prompt += "\nAnswer:"
    if include_answer:
        prompt += f" {q.answer}\n\n"
    return prompt


def gen_prompt(dev: list[MMLUQuestion], subject: str, k: int) -> str:
    prompt = f"The following are multiple choice questions (with answers) about {format_subject(subject)}.\n\n"
    for q in dev[:k]:
        prompt += format_example(q)
    return prompt


def build_prompt(dev: list[MMLUQuestion], subject: str, q: MMLUQuestion, k: int) -> str:
    return gen_prompt(dev, subject, k) + format_example(q, include_answer=False)


def continuation_token(tokenizer: Any, context: str, continuation: str) -> int:
    """First token of `continuation` when tokenized after `context` (lm-evaluation-harness style)."""
    ctx = tokenizer.encode(context, add_bos=False)
    whole = tokenizer.encode(context + continuation, add_bos=False)
    if whole[: len(ctx)] != ctx or len(whole) == len(ctx):
        return tokenizer.encode(continuation, add_bos=False)[0]
    return whole[len(ctx)]


def letter_tokens(tokenizer: Any, letters: list[str] = LETTERS) -> list[int]:
    ids = [continuation_token(tokenizer, "Answer:", f" {c}") for c in letters]
    if len(set(ids)) != len(ids):
        raise InvalidArgumentError(f"the tokenizer maps the answer letters to non-distinct tokens {ids}")
    return ids


def prompt_ids(tokenizer: Any, prompts: list[str]) -> list[list[int]]:
    return tokenizer.encode_batch(prompts)


@dataclass
class MMLUItem:
    subject: str
    index: int
    answer: str
    shots: int
    ids: list[int]


def build_items(tokenizer: Any, folder: Path, subjects: list[str], shot: int, maxlen: int,
                limit: int | None) -> list[MMLUItem]:
    items: list[MMLUItem] = []
    for subject in subjects:
        dev = read_mmlu_csv(folder / "dev" / f"{subject}_dev.csv")
        test = read_mmlu_csv(folder / "test" / f"{subject}_test.csv")
        if limit is not None:
            test = test[:limit]
        k = min(shot, len(dev))
        encoded = prompt_ids(tokenizer, [build_prompt(dev, subject, q, k) for q in test])
        for i, (q, ids) in enumerate(zip(test, encoded, strict=True)):
            kk = k
            while len(ids) > maxlen and kk > 0:
                kk -= 1
                ids = tokenizer.encode(build_prompt(dev, subject, q, kk))
            if len(ids) > maxlen:
                ids = ids[-maxlen:]
            items.append(MMLUItem(subject, i, q.answer, kk, ids))
    return items


@dataclass
class MMLUResult:
    model: str
    dtype: str
    shot: int
    maxlen: int
    scoring: str
    subjects: dict[str, dict[str, Any]]          # subject -> {category, correct, total, acc}
    categories: dict[str, dict[str, float]]      # category -> {macro, micro, correct, total}
    macro: float
    micro: float
    correct: int
    total: int
    wall_s: float
    forward_s: float
    shots_dropped: int = 0                        # questions that got fewer than `shot` examples
    other_scoring: dict[str, Any] = field(default_factory=dict)  # macro/micro of the other scoring
    questions: list[dict[str, Any]] | None = None  # per-question predictions (details=True)
    cpu_s: float = 0.0                            # CPU time of all threads (process_time)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarize(items: list[MMLUItem], preds: dict[int, str]) -> tuple[dict, dict, float, float, int, int]:
    """Per-subject accuracy, the four categories (macro and micro) and the totals."""
    per: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for j, it in enumerate(items):
        per[it.subject][0] += int(preds[j] == it.answer)
        per[it.subject][1] += 1
    subjects = {s: {"category": SUBJECT_CATEGORY.get(s, "other"), "correct": c, "total": n, "acc": c / n}
                for s, (c, n) in sorted(per.items())}
    categories = {}
    for cat in MMLU_CATEGORIES:
        rows = [v for v in subjects.values() if v["category"] == cat]
        if rows:
            c, n = sum(r["correct"] for r in rows), sum(r["total"] for r in rows)
            categories[cat] = {"macro": sum(r["acc"] for r in rows) / len(rows), "micro": c / n,
                               "correct": c, "total": n}
    correct = sum(v["correct"] for v in subjects.values())
    total = sum(v["total"] for v in subjects.values())
    macro = sum(v["acc"] for v in subjects.values()) / max(len(subjects), 1)
    return subjects, categories, macro, correct / max(total, 1), correct, total


def evaluate_mmlu(llm: Any, *, shot: int = 5, maxlen: int = 2048, subjects: list[str] | None = None,
                  limit: int | None = None, data_dir: str | Path | None = None, scoring: str = "logits",
                  store: ResultStore | None = None, batch_tokens: int = DEFAULT_BATCH_TOKENS,
                  progress: bool = True, model_name: str = "", details: bool = False) -> MMLUResult:
    """Accuracy of `llm` on the MMLU test split (all 57 subjects unless `subjects` is given).

    `details=True` also returns every question's predicted letters (both scorings)."""
    if not 0 <= shot <= 5:
        raise InvalidArgumentError("--shot must be between 0 and 5")
    if maxlen < 8:
        raise InvalidArgumentError("--maxlen must be >= 8")
    if scoring not in SCORINGS:
        raise InvalidArgumentError(f"unknown scoring {scoring!r}; choose from {', '.join(SCORINGS)}")
    if limit is not None and limit < 1:
        raise InvalidArgumentError("--limit must be >= 1")
    maxlen = min(maxlen, llm.config.max_seq_len)
    t0, c0 = time.perf_counter(), time.process_time()
    folder = mmlu_dir(data_dir)
    available = mmlu_subjects(folder)
    if subjects:
        unknown = [s for s in subjects if s not in available]
        if unknown:
            raise InvalidArgumentError(f"unknown MMLU subject(s): {', '.join(unknown)}")
    else:
        subjects = available
    tok = llm.tokenizer
    items = build_items(tok, folder, subjects, shot, maxlen, limit)
    letters = letter_tokens(tok)
    fp = model_fingerprint(llm)
    store = store if store is not None else ResultStore(None, "mmlu")

    groups: dict[tuple[str, int], list[Request]] = defaultdict(list)
    for j, it in enumerate(items):
        key = item_key("mmlu", fp, letters, it.ids)
        groups[(it.subject, it.shots)].append(Request(key, it.ids, [len(it.ids) - 1], meta=j))
    runner = Runner(llm, store, progress=progress, desc=f"mmlu {shot}-shot")
    plan = runner.plan(list(groups.values()), batch_tokens)

    def finish(_req: Request, logits: torch.Tensor) -> dict[str, Any]:
        row = logits[-1]
        top = int(row.argmax())
        return {"scores": [float(row[t]) for t in letters], "argmax": top, "argmax_text": tok.decode([top])}

    values = runner.run(plan, finish)
    by_index = {r.meta: values[r.key] for g in plan.groups for r in g}
    preds = {"logits": {}, "argmax": {}}
    for j, v in by_index.items():
        scores = v["scores"]
        preds["logits"][j] = LETTERS[max(range(4), key=lambda i: scores[i])]
        preds["argmax"][j] = v["argmax_text"].strip()
    subj, cats, macro, micro, correct, total = summarize(items, preds[scoring])
    other = "argmax" if scoring == "logits" else "logits"
    _, _, o_macro, o_micro, _, _ = summarize(items, preds[other])
    questions = None
    if details:
        questions = [{"subject": it.subject, "index": it.index, "shots": it.shots, "answer": it.answer,
                      "pred_logits": preds["logits"][j], "pred_argmax": preds["argmax"][j]}
                     for j, it in enumerate(items)]
    return MMLUResult(model=model_name or fp["path"], dtype=fp["dtype"], shot=shot, maxlen=maxlen,
                      scoring=scoring, subjects=subj, categories=cats, macro=macro, micro=micro,
                      correct=correct, total=total, wall_s=time.perf_counter() - t0,
                      forward_s=runner.forward_s, shots_dropped=sum(it.shots < shot for it in items),
                      other_scoring={"scoring": other, "macro": o_macro, "micro": o_micro},
                      questions=questions, cpu_s=time.process_time() - c0)
