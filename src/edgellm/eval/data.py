"""Evaluation data: perplexity corpora (WikiText-2 raw, PTB), MMLU CSVs and multiple-choice reasoning tasks.

Where data comes from, in order: an explicit `--data PATH` / `--data-dir DIR`, `$EDGELLM_DATA_DIR`, a
`shared/data` folder next to (or above) the working directory or this checkout, and finally the Hugging Face
`datasets` library when it is installed and online. Nothing is downloaded by edgellm itself.
"""

from __future__ import annotations

import csv
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InvalidArgumentError

PPL_DATASETS = ("wikitext2", "ptb")

MMLU_CATEGORIES: dict[str, list[str]] = {
    "humanities": [
        "formal_logic", "high_school_european_history", "high_school_us_history", "high_school_world_history",
        "international_law", "jurisprudence", "logical_fallacies", "moral_disputes", "moral_scenarios",
        "philosophy", "prehistory", "professional_law", "world_religions",
    ],
    "social_sciences": [
        "econometrics", "high_school_geography", "high_school_government_and_politics",
        "high_school_macroeconomics", "high_school_microeconomics", "high_school_psychology", "human_sexuality",
        "professional_psychology", "public_relations", "security_studies", "sociology", "us_foreign_policy",
    ],
    "stem": [
        "abstract_algebra", "astronomy", "college_biology", "college_chemistry", "college_computer_science",
        "college_mathematics", "college_physics", "computer_security", "conceptual_physics",
        "electrical_engineering", "elementary_mathematics", "high_school_biology", "high_school_chemistry",
        "high_school_computer_science", "high_school_mathematics", "high_school_physics",
        "high_school_statistics", "machine_learning",
    ],
    "other": [
        "anatomy", "business_ethics", "clinical_knowledge", "college_medicine", "global_facts", "human_aging",
        "management", "marketing", "medical_genetics", "miscellaneous", "nutrition", "professional_accounting",
        "professional_medicine", "virology",
    ],
}
SUBJECT_CATEGORY = {s: c for c, subjects in MMLU_CATEGORIES.items() for s in subjects}


# ---------------------------------------------------------------------------------------------- locating data
def find_data_dir(data_dir: str | Path | None = None, need: str | None = None) -> Path | None:
    """The first existing data folder (containing `need` if given) among the usual places, or None."""
    candidates: list[Path] = []
    if data_dir is not None:
        p = Path(data_dir).expanduser()
        if not p.is_dir():
            raise InvalidArgumentError(f"data directory not found: {p}")
        candidates.append(p)
    env = os.environ.get("EDGELLM_DATA_DIR")
    if env:
        candidates.append(Path(env).expanduser())
    for base in (Path.cwd(), Path(__file__).resolve()):
        for parent in [base, *base.parents][:6]:
            candidates += [parent / "shared" / "data", parent.parent / "shared" / "data"]
    for c in candidates:
        if c.is_dir() and (need is None or (c / need).exists()):
            return c
    return None


def _hf_rows(path: str, name: str, split: str, column: str) -> list[str]:
    try:
        import datasets  # type: ignore[import-not-found]
    except ImportError as e:
        raise InvalidArgumentError(
            f"no local copy of {path} found (pass --data FILE or --data-dir DIR, or set EDGELLM_DATA_DIR); "
            "install the `datasets` package to fetch it from the Hugging Face hub"
        ) from e
    try:
        return list(datasets.load_dataset(path, name, split=split)[column])
    except Exception as e:  # network errors, missing configs, ...
        raise InvalidArgumentError(f"could not load {path}/{name} ({split}) from the hub: {e}") from e


# ---------------------------------------------------------------------------------------------- perplexity
@dataclass
class Corpus:
    name: str
    text: str
    source: str


def wikitext_gptq_text(raw: str) -> str:
    """The HF `wikitext-2-raw-v1` rows re-created from wiki.*.raw, joined with "\\n\\n" (GPTQ recipe)."""
    lines = raw.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    rows = ["" if not line.strip() else line + "\n" for line in lines]
    return "\n\n".join(rows)


def ptb_gptq_text(raw: str) -> str:
    """HF `ptb_text_only` sentences (stripped lines) joined with a space (GPTQ recipe)."""
    lines = raw.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return " ".join(line.strip() for line in lines)


def load_corpus(data: str, split: str = "test", protocol: str = "gptq", data_dir: str | Path | None = None) -> Corpus:
    """Text of `wikitext2`, `ptb` or a local text file, prepared as `protocol` ("gptq" | "llamacpp") wants.

    gptq: WikiText-2 rows joined with "\\n\\n", PTB sentences joined with " ". llamacpp: the raw file as is.
    A local file is always read as is.
    """
    if split not in ("test", "valid", "validation"):
        raise InvalidArgumentError(f"unknown split {split!r}; choose test or valid")
    split = "valid" if split == "validation" else split
    if data not in PPL_DATASETS:
        path = Path(data).expanduser()
        if not path.is_file():
            raise InvalidArgumentError(f"--data {data!r} is neither one of {', '.join(PPL_DATASETS)} nor a file")
        return Corpus(path.name, path.read_text(encoding="utf-8"), str(path))
    rel = f"wikitext-2-raw/wiki.{split}.raw" if data == "wikitext2" else f"ptb/ptb.{split}.txt"
    root = find_data_dir(data_dir, need=rel)
    if root is not None:
        raw = (root / rel).read_text(encoding="utf-8")
        if protocol == "llamacpp":
            text = raw
        else:
            text = wikitext_gptq_text(raw) if data == "wikitext2" else ptb_gptq_text(raw)
        return Corpus(data, text, str(root / rel))
    hf_split = "validation" if split == "valid" else split
    if data == "wikitext2":
        rows = _hf_rows("wikitext", "wikitext-2-raw-v1", hf_split, "text")
        text = "".join(rows) if protocol == "llamacpp" else "\n\n".join(rows)
        return Corpus(data, text, f"hf:wikitext/wikitext-2-raw-v1/{hf_split}")
    rows = _hf_rows("ptb_text_only", "penn_treebank", hf_split, "sentence")
    text = "".join(f" {r} \n" for r in rows) if protocol == "llamacpp" else " ".join(rows)
    return Corpus(data, text, f"hf:ptb_text_only/penn_treebank/{hf_split}")


# ---------------------------------------------------------------------------------------------- MMLU
@dataclass
class MMLUQuestion:
    question: str
    choices: list[str]
    answer: str  # "A".."D"


def read_mmlu_csv(path: Path) -> list[MMLUQuestion]:
    """Rows `question,A,B,C,D,answer` (no header), fields kept exactly as written (embedded CRLF included)."""
    out = []
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.reader(f):
            if not row:
                continue
            if len(row) != 6 or row[5] not in ("A", "B", "C", "D"):
                raise InvalidArgumentError(f"{path}: malformed MMLU row {row[:1]!r}")
            out.append(MMLUQuestion(row[0], row[1:5], row[5]))
    return out


def mmlu_dir(data_dir: str | Path | None = None) -> Path:
    """A folder holding MMLU's dev/ and test/ (given directly, or `mmlu/` under a data folder)."""
    if data_dir is not None:
        p = Path(data_dir).expanduser()
        for c in (p, p / "mmlu"):
            if (c / "test").is_dir() and (c / "dev").is_dir():
                return c
        raise InvalidArgumentError(f"no MMLU data (dev/ and test/ folders) under {p}")
    root = find_data_dir(None, need="mmlu/test")
    if root is None:
        raise InvalidArgumentError("MMLU data not found: pass --data DIR (with dev/ and test/) or set "
                                   "EDGELLM_DATA_DIR")
    return root / "mmlu"


def mmlu_subjects(folder: Path) -> list[str]:
    return sorted(p.name[: -len("_test.csv")] for p in (folder / "test").glob("*_test.csv"))


# ---------------------------------------------------------------------------------------------- reasoning tasks
@dataclass
class MCItem:
    """One multiple-choice item, in both forms: a lettered prompt and context/continuation pairs."""

    id: str
    question: str                 # text before the "A. ..." lines of the lettered prompt
    choices: list[str]            # choice texts
    gold: int
    contexts: list[str] = field(default_factory=list)       # log-likelihood form: one context per choice
    continuations: list[str] = field(default_factory=list)  # ... and the scored continuation (leading space)


REASONING_TASKS = ("arc_e", "arc_c", "piqa", "hellaswag", "commonsense_qa", "boolq", "winogrande")
TASK_ALIASES = {"arc_easy": "arc_e", "arc_challenge": "arc_c", "csqa": "commonsense_qa"}


def _jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _require(root: Path | None, rel: str, task: str) -> Path:
    if root is None or not (root / rel).is_file():
        raise InvalidArgumentError(f"data for {task} not found ({rel}); pass --data-dir or set EDGELLM_DATA_DIR")
    return root / rel


def _qa(id_: str, question: str, choices: list[str], gold: int) -> MCItem:
    ctx = f"Question: {question}\nAnswer:"
    return MCItem(id_, question, choices, gold, [ctx] * len(choices), [f" {c}" for c in choices])


def hellaswag_preprocess(text: str) -> str:
    """lm-evaluation-harness's HellaSwag clean-up (idempotent on the preprocessed copy)."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _arc(path: Path) -> list[MCItem]:
    items = []
    for d in _jsonl(path):
        labels = [c["label"] for c in d["question"]["choices"]]
        texts = [c["text"] for c in d["question"]["choices"]]
        items.append(_qa(d["id"], d["question"]["stem"], texts, labels.index(d["answerKey"])))
    return items


def _winogrande_item(i: int, d: dict) -> MCItem:
    a, b = d["context_options"]
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    n = a.rfind(" ", 0, n) + 1  # back off to a word boundary: the blank starts a word
    cont = d["continuation"].strip()
    sentence = f"{a[:n]}_ {cont}"
    return MCItem(f"wg{i}", sentence, [a[n:], b[n:]], int(d["gold"]), [a, b], [f" {cont}"] * 2)


def load_task(task: str, data_dir: str | Path | None = None) -> tuple[list[MCItem], list[MCItem] | None]:
    """(evaluation items, few-shot pool or None when shots come from the evaluation split itself)."""
    task = TASK_ALIASES.get(task, task)
    if task not in REASONING_TASKS:
        raise InvalidArgumentError(f"unknown task {task!r}; choose from {', '.join(REASONING_TASKS)}")
    root = find_data_dir(data_dir)
    if task in ("arc_e", "arc_c"):
        name = "Easy" if task == "arc_e" else "Challenge"
        test = _arc(_require(root, f"arc/ARC-{name}-Test.jsonl", task))
        dev = _arc(_require(root, f"arc/ARC-{name}-Dev.jsonl", task))
        return test, dev
    if task == "piqa":
        rows = _jsonl(_require(root, "piqa/valid.jsonl", task))
        labels = _require(root, "piqa/valid-labels.lst", task).read_text().split()
        return [_qa(f"piqa{i}", d["goal"], [d["sol1"], d["sol2"]], int(lab))
                for i, (d, lab) in enumerate(zip(rows, labels, strict=True))], None
    if task == "hellaswag":
        items = []
        for i, d in enumerate(_jsonl(_require(root, "hellaswag/hellaswag_val_preprocessed.jsonl", task))):
            ctx = hellaswag_preprocess(d["activity_label"] + ": " + d["ctx"])
            endings = [hellaswag_preprocess(e) for e in d["endings"]]
            items.append(MCItem(f"hs{i}", ctx, endings, int(d["label"]), [ctx] * 4, [f" {e}" for e in endings]))
        return items, None
    if task == "commonsense_qa":
        items = []
        for d in _jsonl(_require(root, "commonsense_qa/dev_rand_split.jsonl", task)):
            labels = [c["label"] for c in d["question"]["choices"]]
            texts = [c["text"] for c in d["question"]["choices"]]
            items.append(_qa(d["id"], d["question"]["stem"], texts, labels.index(d["answerKey"])))
        return items, None
    if task == "boolq":
        items = []
        for d in _jsonl(_require(root, "boolq/val.jsonl", task)):
            q = f"{d['passage']}\nQuestion: {d['question']}?"
            gold = 1 if str(d["label"]).lower() == "true" else 0
            items.append(MCItem(f"bq{d['idx']}", q, ["no", "yes"], gold, [f"{q}\nAnswer:"] * 2, [" no", " yes"]))
        return items, None
    rows = _jsonl(_require(root, "winogrande/winogrande_dev_llmfoundry.jsonl", task))
    return [_winogrande_item(i, d) for i, d in enumerate(rows)], None
