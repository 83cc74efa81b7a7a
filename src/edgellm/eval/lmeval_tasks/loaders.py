"""Local data for edgellm's offline lm-eval tasks: each function returns a `datasets.DatasetDict` whose rows
have the fields lm-eval's own task (HF hub dataset) has, read from `shared/data` (see its README-lmeval.md
and README-reasoning.md). The YAMLs next to this file name them as `custom_dataset`; lm-eval calls them with
the task's metadata and `dataset_kwargs` as keyword arguments, `data_dir` among them when one was given.
"""

from __future__ import annotations

import ast
import csv
import json
import re
from pathlib import Path
from typing import Any

from ...errors import InvalidArgumentError
from ..data import _winogrande_item, find_data_dir, hellaswag_preprocess

MC_README = "shared/data/README-reasoning.md"
LMEVAL_README = "shared/data/README-lmeval.md"


def data_file(rel: str, data_dir: str | Path | None = None, readme: str = LMEVAL_README) -> Path:
    """`rel` under `data_dir` (only there when given) or under the first data folder that has it (see
    `find_data_dir`); a missing file is a one-line error naming the path and where the data comes from."""
    root = Path(data_dir).expanduser() if data_dir is not None else find_data_dir(None, need=rel)
    if root is not None and (root / rel).is_file():
        return root / rel
    base = root if root is not None else find_data_dir(None)
    where = (base if base is not None else Path("shared/data")) / rel
    raise InvalidArgumentError(f"data file not found: {where} (its source is described in {readme}; "
                               "pass --data-dir DIR or set EDGELLM_DATA_DIR to the folder holding it)")


def _dataset(splits: dict[str, list[dict[str, Any]]]) -> Any:
    import datasets

    return datasets.DatasetDict({name: datasets.Dataset.from_list(rows) for name, rows in splits.items()})


def _jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").split("\n")[:-1]


# ---------------------------------------------------------------------------------------------- multiple choice
def arc(subset: str = "Easy", data_dir: str | None = None, **_: Any) -> Any:
    """allenai/ai2_arc rows; validation = the ARC dev file (lm-eval's few-shot source here: no train split)."""
    def rows(split: str) -> list[dict[str, Any]]:
        out = []
        for d in _jsonl(data_file(f"arc/ARC-{subset}-{split}.jsonl", data_dir, MC_README)):
            choices = d["question"]["choices"]
            out.append({"id": d["id"], "question": d["question"]["stem"], "answerKey": d["answerKey"],
                        "choices": {"text": [c["text"] for c in choices], "label": [c["label"] for c in choices]}})
        return out

    return _dataset({"validation": rows("Dev"), "test": rows("Test")})


def piqa(data_dir: str | None = None, **_: Any) -> Any:
    rows = _jsonl(data_file("piqa/valid.jsonl", data_dir, MC_README))
    labels = data_file("piqa/valid-labels.lst", data_dir, MC_README).read_text().split()
    return _dataset({"validation": [{"goal": d["goal"], "sol1": d["sol1"], "sol2": d["sol2"], "label": int(y)}
                                    for d, y in zip(rows, labels, strict=True)]})


def hellaswag(data_dir: str | None = None, **_: Any) -> Any:
    """lm-eval's processed rows (query, choices, label). The local copy is preprocessed and has no ctx_a/ctx_b,
    so the query is "activity_label: ctx" without lm-eval's capitalisation of ctx_b (as `edgellm reasoning`)."""
    rows = []
    for d in _jsonl(data_file("hellaswag/hellaswag_val_preprocessed.jsonl", data_dir, MC_README)):
        rows.append({"query": hellaswag_preprocess(d["activity_label"] + ": " + d["ctx"]),
                     "choices": [hellaswag_preprocess(e) for e in d["endings"]], "label": int(d["label"])})
    return _dataset({"validation": rows})


def boolq(data_dir: str | None = None, **_: Any) -> Any:
    rows = [{"question": d["question"], "passage": d["passage"], "idx": d["idx"],
             "label": int(str(d["label"]).lower() == "true")}
            for d in _jsonl(data_file("boolq/val.jsonl", data_dir, MC_README))]
    return _dataset({"validation": rows})


def winogrande(data_dir: str | None = None, **_: Any) -> Any:
    """winogrande_xl validation rows rebuilt from the converted llm-foundry copy: the sentence up to the blank
    is the options' common prefix (at a word start), so lm-eval's doc_to_choice gives back both contexts."""
    rows = []
    for i, d in enumerate(_jsonl(data_file("winogrande/winogrande_dev_llmfoundry.jsonl", data_dir, MC_README))):
        item = _winogrande_item(i, d)
        rows.append({"sentence": item.question, "option1": item.choices[0], "option2": item.choices[1],
                     "answer": str(item.gold + 1)})
    return _dataset({"validation": rows})


def mmlu(subject: str, data_dir: str | None = None, **_: Any) -> Any:
    """cais/mmlu rows of one subject: test, and dev (the few-shot split)."""
    def rows(split: str) -> list[dict[str, Any]]:
        path = data_file(f"mmlu/{split}/{subject}_{split}.csv", data_dir, "shared/data/mmlu/README.txt")
        with open(path, newline="", encoding="utf-8") as f:
            return [{"question": r[0], "subject": subject, "choices": r[1:5], "answer": "ABCD".index(r[5])}
                    for r in csv.reader(f) if r]

    return _dataset({"test": rows("test"), "dev": rows("dev")})


def truthfulqa_mc(data_dir: str | None = None, **_: Any) -> Any:
    """truthful_qa multiple_choice validation, from the mc_task.json the HF loader reads (same order)."""
    with open(data_file("truthfulqa/mc_task.json", data_dir), encoding="utf-8") as f:
        items = json.load(f)

    def targets(t: dict[str, int]) -> dict[str, list[Any]]:
        return {"choices": list(t), "labels": list(t.values())}

    return _dataset({"validation": [{"question": d["question"], "mc1_targets": targets(d["mc1_targets"]),
                                     "mc2_targets": targets(d["mc2_targets"])} for d in items]})


# ---------------------------------------------------------------------------------------------- generation
def _dpr_qa(path: Path) -> list[dict[str, Any]]:
    with open(path, newline="", encoding="utf-8") as f:
        return [{"question": q, "answer": {"aliases": list(ast.literal_eval(a)), "value": ast.literal_eval(a)[0]}}
                for q, a in csv.reader(f, delimiter="\t")]


def triviaqa(data_dir: str | None = None, **_: Any) -> Any:
    """TriviaQA questions with their answer aliases: validation = the unfiltered dev set (11,313 questions, DPR's
    "test"), train = DPR's held-out train questions (8,837, few-shot only). lm-eval's `triviaqa` evaluates the
    rc.nocontext validation split (17,944 rows) instead, which is not available offline."""
    return _dataset({"validation": _dpr_qa(data_file("triviaqa/topics.dpr.trivia.test.txt", data_dir)),
                     "train": _dpr_qa(data_file("triviaqa/topics.dpr.trivia.dev.txt", data_dir))})


SEG = re.compile(r"<seg id=\"\d+\">(.*)</seg>")
WMT_TEST = {"wmt14": "newstest2014", "wmt16": "newstest2016"}
WMT_VALID = {("wmt14", "fr-en"): "newstest2013", ("wmt16", "de-en"): "newstest2015"}  # no newsdev2016 ro-en


def _sgm(path: Path) -> list[str]:
    """Segment texts as the HF `wmt14` builder reads them: the raw <seg> content, not stripped or unescaped."""
    with open(path, encoding="utf-8") as f:
        return [m.group(1) for line in f if (m := SEG.match(line))]


def _pairs(src: list[str], ref: list[str], a: str, b: str) -> list[dict[str, Any]]:
    if len(src) != len(ref):
        raise InvalidArgumentError(f"WMT files of {a}-{b} are not line-aligned ({len(src)} vs {len(ref)} lines)")
    return [{"translation": {a: s, b: r}} for s, r in zip(src, ref, strict=True) if s and r]


def wmt(year: str, pair: str, data_dir: str | None = None, **_: Any) -> Any:
    """HF `wmt14` fr-en / `wmt16` de-en, ro-en rows ({"translation": {xx: .., en: ..}}): the test set (newstest2014
    from the original SGML, as HF reads it; newstest2016 as plain text) and, where we have it, the validation
    set used for few-shot examples. Both directions of a pair use the same rows."""
    src, tgt = pair.split("-")
    if year == "wmt14":
        sgm = "wmt/jiant-test-full-sgm/newstest2014-fren-"
        test = _pairs(_sgm(data_file(f"{sgm}src.fr.sgm", data_dir)), _sgm(data_file(f"{sgm}ref.en.sgm", data_dir)),
                      src, tgt)
    else:
        base = f"wmt/opus-mt-testsets/{pair}/{WMT_TEST[year]}"
        test = _pairs(_lines(data_file(f"{base}.{src}", data_dir)), _lines(data_file(f"{base}.{tgt}", data_dir)),
                      src, tgt)
    splits = {"test": test}
    if (year, pair) in WMT_VALID:
        base = f"wmt/opus-mt-testsets/{pair}/{WMT_VALID[year, pair]}"
        splits["validation"] = _pairs(_lines(data_file(f"{base}.{src}", data_dir)),
                                      _lines(data_file(f"{base}.{tgt}", data_dir)), src, tgt)
    return _dataset(splits)


# ---------------------------------------------------------------------------------------------- lm-eval's task code
# Copies of lm-eval's functions for these tasks (lm_eval/tasks/winogrande/preprocess_winogrande.py and
# truthfulqa/utils.py), so the YAMLs do not depend on where lm-eval keeps them.
def winogrande_doc_to_text(doc: dict[str, Any]) -> int:
    return {"1": 0, "2": 1}[doc["answer"]]


def winogrande_doc_to_target(doc: dict[str, Any]) -> str:
    idx = doc["sentence"].index("_") + 1
    return doc["sentence"][idx:].strip()


def winogrande_doc_to_choice(doc: dict[str, Any]) -> list[str]:
    idx = doc["sentence"].index("_")
    return [doc["sentence"][:idx] + opt for opt in (doc["option1"], doc["option2"])]


def truthfulqa_mc2_results(doc: dict[str, Any], results: list[tuple[float, bool]]) -> dict[str, float]:
    """The normalised probability mass of the true answers among all of the item's mc2 answers."""
    import numpy as np

    ll = np.array([r[0] for r in results])
    probs = np.exp(ll)
    probs_norm = probs / np.sum(probs)
    labels = np.array(doc["mc2_targets"]["labels"])
    return {"acc": float(np.sum(probs_norm[labels == 1]))}
