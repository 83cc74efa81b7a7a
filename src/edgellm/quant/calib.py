"""Calibration data: token windows from WikiText-2 *valid*, PTB *valid* or a local text file.

Test splits are refused: the accuracy tables evaluate on them, and calibrating on what you evaluate
flatters the result.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import InvalidArgumentError, ModelNotFoundError

DATASET_FILES = {  # (name, split) -> path under the shared data folder
    ("wikitext2", "valid"): "wikitext-2-raw/wiki.valid.raw",
    ("wikitext2", "test"): "wikitext-2-raw/wiki.test.raw",
    ("ptb", "valid"): "ptb/ptb.valid.txt",
    ("ptb", "test"): "ptb/ptb.test.txt",
}


def data_dir() -> Path:
    """$EDGELLM_DATA, else the `shared/data` folder next to the checkout, else ./shared/data."""
    env = os.environ.get("EDGELLM_DATA")
    candidates = [Path(env)] if env else []
    here = Path(__file__).resolve()
    candidates += [p / "shared" / "data" for p in here.parents] + [Path.cwd() / "shared" / "data"]
    for c in candidates:
        if (c / "wikitext-2-raw").is_dir() or (c / "ptb").is_dir():
            return c
    raise ModelNotFoundError("evaluation data not found: set EDGELLM_DATA to the folder holding "
                             "wikitext-2-raw/ and ptb/")


def dataset_text(name: str, split: str) -> str:
    """The text of a split, joined the way the usual Llama/GPTQ perplexity recipe does."""
    key = (name.lower().replace("-", "").replace("_", ""), split)
    if key not in DATASET_FILES:
        raise InvalidArgumentError(f"unknown dataset {name!r}/{split!r}; known: wikitext2, ptb (valid, test)")
    raw = (data_dir() / DATASET_FILES[key]).read_text(encoding="utf-8")
    if key[0] == "wikitext2":
        # HF rows keep their "\n" and blank rows are ""; the recipe joins rows with "\n\n".
        return "\n\n".join("" if not line.strip() else line + "\n" for line in raw.split("\n")[:-1])
    return " ".join(line.strip() for line in raw.split("\n") if line.strip())  # HF ptb "sentence" rows


@dataclass
class CalibConfig:
    data: str = "wikitext2"   # "wikitext2" | "ptb" (their valid splits) or a path to a UTF-8 text file
    n_samples: int = 128
    seqlen: int = 512
    seed: int = 0

    def describe(self) -> str:
        src = f"{self.data} valid" if self.data in ("wikitext2", "ptb") else self.data
        return f"{src}, {self.n_samples} x {self.seqlen} tokens (seed {self.seed})"


def calibration_text(data: str) -> str:
    if data in ("wikitext2", "ptb"):
        return dataset_text(data, "valid")
    path = Path(data).expanduser()
    if not path.is_file():
        raise InvalidArgumentError(f"calibration data {data!r} is neither wikitext2, ptb nor a text file")
    if "test" in path.name.lower():
        raise InvalidArgumentError(f"refusing to calibrate on {path.name}: it looks like a test split, and "
                                   "calibrating on evaluation data flatters the result")
    return path.read_text(encoding="utf-8")


def calibration_ids(tokenizer, cfg: CalibConfig) -> torch.Tensor:
    """(n_samples, seqlen) token ids: distinct non-overlapping windows of the tokenized text, chosen at random
    with a fixed seed (fewer, with a note, if the text is short)."""
    ids = torch.tensor(tokenizer.encode(calibration_text(cfg.data)), dtype=torch.long)
    n_windows = ids.numel() // cfg.seqlen
    if n_windows == 0:
        raise InvalidArgumentError(f"calibration text has {ids.numel()} tokens, fewer than seqlen={cfg.seqlen}")
    g = torch.Generator().manual_seed(cfg.seed)
    pick = torch.randperm(n_windows, generator=g)[:cfg.n_samples].sort().values
    return ids[: n_windows * cfg.seqlen].view(n_windows, cfg.seqlen)[pick].clone()
