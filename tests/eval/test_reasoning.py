"""Reasoning tasks: the lettered prompt, harness-style continuation encoding, metrics, CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from edgellm.cli import main
from edgellm.errors import InvalidArgumentError
from edgellm.eval.data import MCItem, load_task
from edgellm.eval.reasoning import encode_pair, evaluate_task, mc_prompt, shots_for


def test_lettered_prompt_seed_style():
    item = MCItem("x", "Which technology was developed most recently?",
                  ["cellular telephone", "television", "refrigerator", "airplane"], 0)
    shot = MCItem("s", "2+2?", ["3", "4"], 1)
    assert mc_prompt(item, []) == (
        "The following are multiple choice questions (with answers) about common sense reasoning.\n\n"
        "Which technology was developed most recently?\nA. cellular telephone\nB. television\n"
        "C. refrigerator\nD. airplane\nAnswer:")
    assert mc_prompt(item, [shot]).split("\n\n")[1] == "2+2?\nA. 3\nB. 4\nAnswer: B"


def test_shots_exclude_the_item_itself():
    items = [MCItem(str(i), "q", ["a", "b"], 0) for i in range(5)]
    assert shots_for(1, items, None, 2)[0] == "0,2"
    assert shots_for(4, items, None, 2)[0] == "0,1"
    assert shots_for(0, items, items[:3], 2)[0] == "dev"


def test_encode_pair_moves_trailing_space(llm_bf16):
    tok = llm_bf16.tokenizer
    ctx, cont = encode_pair(tok, "Question: Is it?\nAnswer: ", "yes")
    ctx2, cont2 = encode_pair(tok, "Question: Is it?\nAnswer:", " yes")
    assert (ctx, cont) == (ctx2, cont2) and tok.decode(cont) == " yes"


def test_loglikelihood_matches_a_plain_forward(llm_fp32, data_dir):
    """acc from our batched run equals summing log-probs of each continuation from one unbatched forward."""
    from edgellm.eval.cache import ResultStore

    items, _ = load_task("piqa", data_dir)
    store = ResultStore(None, "r")
    res = evaluate_task(llm_fp32, "piqa", modes=("ll",), limit=4, data_dir=data_dir, store=store, progress=False)
    tok = llm_fp32.tokenizer
    correct = 0
    for it in items[:4]:
        lls = []
        for ctx_text, cont_text in zip(it.contexts, it.continuations, strict=True):
            ctx, cont = encode_pair(tok, ctx_text, cont_text)
            logits = llm_fp32.logits(ctx + cont)
            lp = F.log_softmax(logits[len(ctx) - 1:-1], -1).gather(-1, torch.tensor(cont)[:, None]).sum()
            lls.append(float(lp))
        correct += int(max(range(2), key=lls.__getitem__) == it.gold)
        stored = sorted(v["ll"] for v in store.values.values())
        assert any(math.isclose(lls[0], s, rel_tol=1e-4) for s in stored)
    assert res.metrics["ll_acc"] == correct / 4


@pytest.mark.parametrize("task", ["arc_c", "hellaswag", "commonsense_qa", "boolq", "winogrande"])
def test_tasks_run(llm_bf16, data_dir, task):
    r = evaluate_task(llm_bf16, task, shot=1, limit=3, data_dir=data_dir, progress=False)
    assert r.items == 3
    assert set(r.metrics) == {"mc_acc", "mc_acc_argmax", "ll_acc", "ll_acc_norm"}
    assert all(0 <= v <= 1 for v in r.metrics.values())


def test_bad_task_and_mode(llm_bf16, data_dir):
    with pytest.raises(InvalidArgumentError):
        evaluate_task(llm_bf16, "mmlu", data_dir=data_dir)
    with pytest.raises(InvalidArgumentError):
        evaluate_task(llm_bf16, "piqa", modes=("guess",), data_dir=data_dir)


def test_cli(capsys, tmp_path, data_dir):
    args = ["reasoning", "--tasks", "arc_e,piqa", "--limit", "3", "--no-progress", "--data-dir", str(data_dir),
            "--cache-dir", str(tmp_path)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "| arc_e" in out and "ll_acc_norm" in out
    assert main(args + ["--json"]) == 0
    res = json.loads(capsys.readouterr().out)["results"]
    assert [r["task"] for r in res] == ["arc_e", "piqa"]
    assert main(["reasoning", "--tasks", "arc_e,nope", "--no-cache"]) == 2
