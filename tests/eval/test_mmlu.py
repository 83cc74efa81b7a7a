"""MMLU: the Hendrycks prompt byte for byte, shot dropping, parity with transformers, scoring, CLI."""

from __future__ import annotations

import json

import pytest
import torch

from edgellm.cli import main
from edgellm.errors import InvalidArgumentError
from edgellm.eval.data import mmlu_dir, read_mmlu_csv
from edgellm.eval.mmlu import LETTERS, build_items, build_prompt, evaluate_mmlu, letter_tokens

PARITY_SUBJECTS = ["anatomy", "management", "miscellaneous"]


def load(data_dir, subject):
    folder = mmlu_dir(data_dir)
    return read_mmlu_csv(folder / "dev" / f"{subject}_dev.csv"), read_mmlu_csv(folder / "test" / f"{subject}_test.csv")


def test_zero_shot_prompt_is_hendrycks_format(data_dir):
    dev, test = load(data_dir, "abstract_algebra")
    assert build_prompt(dev, "abstract_algebra", test[0], 0) == (
        "The following are multiple choice questions (with answers) about  abstract algebra.\n\n"
        "Find the degree for the given field extension Q(sqrt(2), sqrt(3), sqrt(18)) over Q.\n"
        "A. 0\nB. 4\nC. 2\nD. 6\nAnswer:")


def test_two_shot_prompt_is_hendrycks_format(data_dir):
    dev, test = load(data_dir, "management")
    prompt = build_prompt(dev, "management", test[2], 2)
    expected_end = ("What is a normative perspective?\nA. The way things are.\nB. The way things are going to be.\n"
                    "C. The way things should be.\nD. The way things were.\nAnswer:")
    header = "The following are multiple choice questions (with answers) about  management.\n\n"
    shot0 = (f"{dev[0].question}\nA. {dev[0].choices[0]}\nB. {dev[0].choices[1]}\nC. {dev[0].choices[2]}\n"
             f"D. {dev[0].choices[3]}\nAnswer: {dev[0].answer}\n\n")
    assert prompt.startswith(header + shot0) and prompt.endswith(expected_end)
    assert prompt.count("\nAnswer:") == 3 and prompt.count("Answer: ") == 2


def test_shots_dropped_one_at_a_time(llm_bf16, data_dir):
    tok = llm_bf16.tokenizer
    dev, test = load(data_dir, "management")
    lens = [len(tok.encode(build_prompt(dev, "management", test[0], k))) for k in range(6)]
    maxlen = lens[3]  # 3 shots fit exactly, 4 do not
    items = build_items(tok, mmlu_dir(data_dir), ["management"], 5, maxlen, limit=1)
    assert items[0].shots == 3 and len(items[0].ids) == lens[3]
    items = build_items(tok, mmlu_dir(data_dir), ["management"], 5, lens[0] - 2, limit=1)
    assert items[0].shots == 0 and len(items[0].ids) == lens[0] - 2  # left-truncated as a last resort


def test_letter_tokens_are_the_space_letters(llm_bf16):
    tok = llm_bf16.tokenizer
    ids = letter_tokens(tok)
    assert [tok.decode([i]) for i in ids] == [" A", " B", " C", " D"]


@pytest.mark.parametrize("shot", [0, 5])
def test_predictions_match_transformers(llm_fp32, hf_ref, data_dir, shot):
    """Question by question, the letters of our batched, prefix-cached run equal a plain transformers
    forward of each whole prompt (both scorings)."""
    limit = 3
    res = evaluate_mmlu(llm_fp32, shot=shot, subjects=PARITY_SUBJECTS, limit=limit, data_dir=data_dir,
                        progress=False, details=True)
    ours = [(q["subject"], q["index"], q["pred_logits"], q["pred_argmax"]) for q in res.questions]
    tok = llm_fp32.tokenizer
    letters = letter_tokens(tok)
    ref = []
    for subject in PARITY_SUBJECTS:
        dev, test = load(data_dir, subject)
        for i, q in enumerate(test[:limit]):
            ids = torch.tensor([tok.encode(build_prompt(dev, subject, q, shot))])
            with torch.no_grad():
                row = hf_ref(ids).logits[0, -1].float()
            ref.append((subject, i, LETTERS[int(row[letters].argmax())], tok.decode([int(row.argmax())]).strip()))
    assert ours == ref


def test_bad_arguments(llm_bf16, data_dir):
    with pytest.raises(InvalidArgumentError):
        evaluate_mmlu(llm_bf16, shot=6, data_dir=data_dir)
    with pytest.raises(InvalidArgumentError):
        evaluate_mmlu(llm_bf16, subjects=["astrology"], data_dir=data_dir)
    with pytest.raises(InvalidArgumentError):
        evaluate_mmlu(llm_bf16, scoring="vibes", data_dir=data_dir)


def test_cli_tables_and_json(capsys, tmp_path, data_dir):
    args = ["mmlu", "--shot", "0", "--subjects", "anatomy", "global_facts", "--limit", "2", "--no-progress",
            "--data", str(data_dir / "mmlu"), "--cache-dir", str(tmp_path)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "| anatomy" in out and "| other" in out and "total macro-average / total micro-average" in out
    assert main(args + ["--json", "--scoring", "argmax"]) == 0
    res = json.loads(capsys.readouterr().out)["results"][0]
    assert res["total"] == 4 and res["scoring"] == "argmax" and set(res["categories"]) == {"other"}
    assert main(["mmlu", "--data", str(tmp_path / "none"), "--no-cache"]) == 2
