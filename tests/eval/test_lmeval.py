"""edgellm as an lm-evaluation-harness model, against lm-eval's own `hf` model on the same fp32 weights (the
bundled GGUF, dequantized by transformers), on edgellm's offline tasks; consistency with `edgellm reasoning`;
the task definitions against lm-eval's own; the CLI verb and its errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # transformers needs it to load GGUF files

from lm_eval import simple_evaluate  # noqa: E402

from edgellm.cli import main  # noqa: E402
from edgellm.errors import InvalidArgumentError  # noqa: E402
from edgellm.eval.engine import Request  # noqa: E402
from edgellm.eval.lmeval import TASKS_DIR, EdgeLLM, group_requests, task_manager  # noqa: E402
from edgellm.eval.lmeval_tasks import loaders  # noqa: E402
from edgellm.eval.reasoning import evaluate_task  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

N = 50  # items per task for parity and consistency
PARITY_TASKS = ["arc_easy", "hellaswag", "truthfulqa_mc2", "triviaqa"]
GEN_KWARGS = {"max_gen_toks": 32}  # both models; the TriviaQA answers stop at "\n", "." or "," long before


@pytest.fixture(scope="module")
def tasks(data_dir):
    return task_manager(data_dir)


@pytest.fixture(scope="module")
def ours(llm_fp32):
    return EdgeLLM(llm=llm_fp32, progress=False)


@pytest.fixture(scope="module")
def hf(default_gguf):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(default_gguf.parent), gguf_file=default_gguf.name, dtype="float32", device="cpu",
                batch_size=32)


def _run(model, tasks, names, limit=N):
    return simple_evaluate(model=model, tasks=names, limit=limit, task_manager=tasks, log_samples=True,
                           bootstrap_iters=0, gen_kwargs=GEN_KWARGS)


@pytest.fixture(scope="module")
def runs(ours, hf, tasks):
    return _run(ours, tasks, PARITY_TASKS), _run(hf, tasks, PARITY_TASKS)


# ---------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("task", ["arc_easy", "hellaswag", "truthfulqa_mc2"])
def test_loglikelihoods_match_hf(runs, task):
    a, b = (r["samples"][task] for r in runs)
    assert len(a) == len(b) == N
    worst, requests = 0.0, 0
    for x, y in zip(a, b, strict=True):
        assert x["doc_id"] == y["doc_id"] and x["arguments"] == y["arguments"]
        for (ll_x, greedy_x), (ll_y, greedy_y) in ((r[0], s[0]) for r, s in zip(x["resps"], y["resps"], strict=True)):
            worst = max(worst, abs(float(ll_x) - float(ll_y)))
            assert bool(greedy_x) == bool(greedy_y)
            requests += 1
    print(f"{task}: {requests} requests, max |ll difference| {worst:.2e}")
    assert requests >= 2 * N and worst <= 1e-3


def test_greedy_generations_match_hf(runs):
    a, b = (r["samples"]["triviaqa"] for r in runs)
    assert [x["arguments"] for x in a] == [y["arguments"] for y in b]
    assert [x["resps"] for x in a] == [y["resps"] for y in b]
    assert len(a) == N and any(x["resps"][0][0].strip() for x in a)


@pytest.mark.parametrize("task", PARITY_TASKS)
def test_task_metrics_match_hf(runs, task):
    a, b = (r["results"][task] for r in runs)
    metrics = [k for k in b if "," in k and "stderr" not in k]
    assert metrics and set(metrics) <= set(a)
    for k in metrics:
        if task == "truthfulqa_mc2":  # a mean of probabilities made from the log-likelihoods above
            assert a[k] == pytest.approx(b[k], abs=1e-4), k
        else:  # accuracies / exact match: the same items right
            assert a[k] == b[k], k


def test_rolling_windows_match_hf(ours, hf):
    """loglikelihood_rolling on lm-eval's windows (several per text at a 24-token max_length)."""
    from lm_eval.api.instance import Instance

    texts = ["The quick brown fox jumps over the lazy dog. " * 6, "Photosynthesis converts light energy into "
             "chemical energy that can later be released to fuel the organism's activities."]
    reqs = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)]
    saved = ours._max_length, hf._max_length
    ours._max_length = hf._max_length = 24
    try:
        got, expected = ours.loglikelihood_rolling(reqs), hf.loglikelihood_rolling(reqs, disable_tqdm=True)
    finally:
        ours._max_length, hf._max_length = saved
    assert got == pytest.approx(expected, abs=1e-3)


# ---------------------------------------------------------------------------------------------- consistency
def test_accuracy_equals_edgellm_reasoning(runs, ours, tasks, llm_fp32, data_dir):
    """lm-eval's acc / acc_norm through edgellm equal `edgellm reasoning`'s ll_acc / ll_acc_norm, same items."""
    piqa = simple_evaluate(model=ours, tasks=["piqa"], limit=N, task_manager=tasks, bootstrap_iters=0)
    lm = {"arc_easy": runs[0]["results"]["arc_easy"], "hellaswag": runs[0]["results"]["hellaswag"],
          "piqa": piqa["results"]["piqa"]}
    for task, ours_name in (("arc_easy", "arc_e"), ("hellaswag", "hellaswag"), ("piqa", "piqa")):
        r = evaluate_task(llm_fp32, ours_name, modes=("ll",), limit=N, data_dir=data_dir, progress=False)
        assert r.items == N
        assert lm[task]["acc,none"] == r.metrics["ll_acc"], task
        assert lm[task]["acc_norm,none"] == r.metrics["ll_acc_norm"], task


# ---------------------------------------------------------------------------------------------- tasks
LMEVAL_YAML = {"arc_easy": "arc/arc_easy.yaml", "piqa": "piqa/piqa.yaml", "hellaswag": "hellaswag/hellaswag.yaml",
               "boolq": "super_glue/boolq/default.yaml", "truthfulqa_mc1": "truthfulqa/truthfulqa_mc1.yaml",
               "triviaqa": "triviaqa/default.yaml", "wmt16-de-en": "translation/wmt16_de-en.yaml",
               "wmt14-en-fr": "translation/wmt14_en-fr.yaml", "mmlu/mmlu_anatomy": "mmlu/default/mmlu_anatomy.yaml"}
DATA_KEYS = {"dataset_path", "dataset_name", "dataset_kwargs", "custom_dataset", "training_split", "validation_split",
             "test_split", "fewshot_split", "process_docs", "tag", "include"}


@pytest.mark.parametrize("name", sorted(LMEVAL_YAML))
def test_prompts_and_metrics_are_lm_evals(name):
    """Every prompt / target / choice / metric / generation field of lm-eval's YAML is the same in ours."""
    from pathlib import Path

    from lm_eval.tasks._yaml_loader import load_yaml

    theirs = load_yaml(Path(lm_eval.__file__).parent / "tasks" / LMEVAL_YAML[name], resolve_func=False)
    mine = load_yaml(TASKS_DIR / f"{name}.yaml", resolve_func=False)
    for key in set(theirs) - DATA_KEYS - {"process_results"}:
        assert mine.get(key) == theirs[key], key


def test_task_code_is_lm_evals():
    from lm_eval.tasks.truthfulqa.utils import process_results_mc2
    from lm_eval.tasks.winogrande import preprocess_winogrande as wg

    doc = {"sentence": "Sarah was a better surgeon than Maria so _ got the easier cases.", "option1": "Sarah",
           "option2": "Maria", "answer": "2", "mc2_targets": {"labels": [1, 0, 1]}}
    for fn in ("doc_to_text", "doc_to_target", "doc_to_choice"):
        assert getattr(loaders, f"winogrande_{fn}")(doc) == getattr(wg, fn)(doc)
    results = [(-1.0, False), (-2.5, True), (-0.3, False)]
    expected = process_results_mc2(doc, results)["acc"]
    assert loaders.truthfulqa_mc2_results(doc, results)["acc"] == pytest.approx(expected)


def test_every_task_loads_offline(tasks):
    names = ["arc_easy", "arc_challenge", "piqa", "hellaswag", "boolq", "winogrande", "truthfulqa_mc1",
             "truthfulqa_mc2", "triviaqa", "wmt14-fr-en", "wmt14-en-fr", "wmt16-de-en", "wmt16-en-de",
             "wmt16-ro-en", "wmt16-en-ro", "mmlu"]
    loaded = tasks.load(names)
    sizes = {n: len(list(t.eval_docs)) for n, t in loaded["tasks"].items()}
    assert {k: sizes[k] for k in ("arc_easy", "hellaswag", "truthfulqa_mc2", "triviaqa", "wmt14-fr-en",
                                  "wmt16-de-en", "wmt16-ro-en", "winogrande", "boolq")} == {
        "arc_easy": 2376, "hellaswag": 10042, "truthfulqa_mc2": 817, "triviaqa": 11313, "wmt14-fr-en": 3003,
        "wmt16-de-en": 2999, "wmt16-ro-en": 1999, "winogrande": 1267, "boolq": 3270}
    assert sum(v for k, v in sizes.items() if k.startswith("mmlu_")) == 14042
    winogrande = loaded["tasks"]["winogrande"]
    doc = next(iter(winogrande.eval_docs))
    assert winogrande.doc_to_choice(doc) == ["Sarah was a much better surgeon than Maria so Sarah",
                                             "Sarah was a much better surgeon than Maria so Maria"]


def test_missing_data_is_one_line_naming_the_path(tmp_path):
    (tmp_path / "arc").mkdir()
    with pytest.raises(InvalidArgumentError, match=r"not found: .*truthfulqa/mc_task\.json.*README-lmeval"):
        loaders.truthfulqa_mc(data_dir=str(tmp_path))
    with pytest.raises(InvalidArgumentError) as e:
        task_manager(tmp_path).load(["arc_easy"])
    assert "ARC-Easy-Dev.jsonl" in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------- engine use
def test_group_requests_shares_questions_and_fewshot_prefixes():
    shots = list(range(100, 300))  # a 200-token few-shot prefix every question shares
    reqs = []
    for q in range(30):
        for c in range(4):
            ids = [*shots, 1000 + q, *range(2000, 2030), 3000 + c, 3001]
            reqs.append(Request(f"{q}{c}", ids, [len(ids) - 2, len(ids) - 1]))
    groups = group_requests(reqs)
    assert len(groups) == 1 and len(groups[0]) == 120  # one group: the 200-token prefix, computed once
    alone = [Request(str(i), [i, *range(5000, 5010)], [10]) for i in range(5)]  # nothing worth sharing
    assert group_requests(alone) == [sorted(alone, key=lambda r: r.ids)]
    questions = [Request(f"{q}{c}", [q, *range(6000 + 50 * q, 6040 + 50 * q), c], [40]) for q in range(3)
                 for c in range(4)]
    assert len(group_requests(questions)) == 1  # 4 choices sharing 40 tokens: cheaper in full unshared batches
    long = [Request(f"{q}{c}", [q, *range(6000, 8000), c], [2000]) for q in range(2) for c in range(4)]
    assert sorted(len(g) for g in group_requests(long)) == [4, 4]  # each question's 4 choices share 2000 tokens


def test_batched_generation_equals_each_request_alone(ours, monkeypatch):
    """generate_until decodes its requests together (serve engine, continuous batching) and gives each the text
    llm.generate gives it alone: stop strings, lengths and the model's own caches afterwards included."""
    from types import SimpleNamespace

    from edgellm.eval import lmeval

    monkeypatch.setattr(lmeval, "GEN_ROWS", 2)  # fewer rows than requests: rows are reused
    reqs = [SimpleNamespace(args=("Question: What is the capital of France?\nAnswer:",
                                  {"until": ["\n"], "max_gen_toks": 12})),
            SimpleNamespace(args=("The three primary colors are", {"until": ["."], "max_gen_toks": 20})),
            SimpleNamespace(args=("Once upon a time", {"until": [], "max_gen_toks": 7})),
            SimpleNamespace(args=("1, 2, 3, 4,", {"until": [" 7"], "max_gen_toks": 16}))]
    got = ours.generate_until(reqs)
    alone = [ours.generate_until([r])[0] for r in reqs]                 # one request: llm.generate
    assert got == alone and sum(map(bool, got)) >= 3
    assert "\n" not in got[0] and "." not in got[1] and " 7" not in got[3]


def test_one_forward_row_per_distinct_input(ours):
    """Requests whose inputs are the same (one-token continuations of one context) share a row, as lm-eval's
    logits cache does; results still come back per request, in order."""
    ctx = ours.tok_encode("Question: What is the capital of France?\nAnswer:")
    conts = [ours.tok_encode(" Paris"), ours.tok_encode(" Rome"), ours.tok_encode(" Paris")]
    out = ours._loglikelihood_tokens([(None, ctx, c) for c in conts])
    logits = ours.llm.logits(ctx)[-1]
    logp = torch.log_softmax(logits, -1)
    assert out[0] == out[2] and out[0][0] > out[1][0]
    assert out[1][0] == pytest.approx(float(logp[conts[1][0]]), abs=1e-4)


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_runs_a_task(capsys, data_dir, tmp_path):
    rc = main(["lm-eval", "--tasks", "arc_easy,boolq", "--limit", "3", "--model-args", "dtype=fp32",
               "--data-dir", str(data_dir), "--no-compile", "--no-progress", "--json", "--bootstrap-iters", "0",
               "--output-path", str(tmp_path / "out")])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["results"]) == {"arc_easy", "boolq"}
    assert out["edgellm"]["items"] == {"arc_easy": 3, "boolq": 3}
    assert list((tmp_path / "out").rglob("results_*.json"))


def test_cli_errors_are_one_line(capsys, monkeypatch):
    assert main(["lm-eval", "--tasks", "no_such_task", "--no-compile"]) == 2
    assert "unknown task(s) no_such_task" in capsys.readouterr().err
    assert main(["lm-eval", "--tasks", "arc_easy", "--model-args", "dtype=fp32,colour=blue", "--no-compile"]) == 2
    assert "unknown edgellm model arg(s): colour" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if lm-eval were not installed
    assert main(["lm-eval", "--tasks", "arc_easy"]) == 2
    err = capsys.readouterr().err
    assert "pip install edgellm[lmeval]" in err and err.count("\n") == 1


def test_edgellm_imports_without_lm_eval():
    code = ("import sys; sys.modules['lm_eval'] = None\n"
            "import edgellm, edgellm.cli; edgellm.cli.build_parser()\n"
            "assert not any(m.startswith('lm_eval') for m in sys.modules if sys.modules[m] is not None)")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_adapter_model_arg_scores_with_the_adapter(tiny_checkpoints, tmp_path):
    """`adapter=DIR` (and `edgellm lm-eval --adapter`) evaluates the model with a PEFT LoRA adapter applied."""
    peft = pytest.importorskip("peft")
    import transformers

    path = tiny_checkpoints["llama"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.1)
    pm.save_pretrained(tmp_path / "ad")
    ids = torch.randint(3, 300, (20,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = pm(input_ids=ids[None]).logits[0]
    lm = EdgeLLM(pretrained=str(path), dtype="fp32", adapter=str(tmp_path / "ad"), progress=False)
    assert float((lm.llm.logits(ids) - ref).abs().max()) <= 1e-4
    plain = EdgeLLM(pretrained=str(path), dtype="fp32", progress=False)
    assert float((plain.llm.logits(ids) - ref).abs().max()) > 1e-3  # the adapter made a difference
