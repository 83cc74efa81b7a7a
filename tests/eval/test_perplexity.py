"""Perplexity: parity with a plain transformers reference on the same token ids, protocols, CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from edgellm.cli import main
from edgellm.errors import InvalidArgumentError
from edgellm.eval.data import load_corpus
from edgellm.eval.perplexity import evaluate_perplexity, make_windows

SEQLEN, WINDOWS = 512, 8


@pytest.fixture(scope="module")
def wiki_ids(llm_fp32, data_dir):
    return llm_fp32.tokenizer.encode(load_corpus("wikitext2", data_dir=data_dir).text)


@pytest.fixture(scope="module")
def reference_ppl(hf_ref, wiki_ids):
    """GPTQ-style loop with transformers: every window scores its 511 next-token predictions."""
    windows = torch.tensor(wiki_ids[: WINDOWS * SEQLEN]).view(WINDOWS, SEQLEN)
    nlls = []
    with torch.no_grad():
        for i in range(0, WINDOWS, 4):
            logits = hf_ref(windows[i:i + 4]).logits.float()
            for b in range(logits.shape[0]):
                nlls.append(F.cross_entropy(logits[b, :-1], windows[i + b, 1:], reduction="mean").item())
    return math.exp(sum(nlls) / len(nlls))


def test_fp32_matches_transformers(llm_fp32, wiki_ids, reference_ppl):
    r = evaluate_perplexity(llm_fp32, wiki_ids, SEQLEN, nsamples=WINDOWS, progress=False)
    assert r.windows == WINDOWS and r.tokens_scored == WINDOWS * (SEQLEN - 1)
    assert abs(r.ppl / reference_ppl - 1) < 1e-3, (r.ppl, reference_ppl)


def test_bf16_within_one_percent(llm_bf16, wiki_ids, reference_ppl):
    r = evaluate_perplexity(llm_bf16, wiki_ids, SEQLEN, nsamples=WINDOWS, progress=False)
    assert abs(r.ppl / reference_ppl - 1) < 1e-2, (r.ppl, reference_ppl)


def test_windows_drop_the_tail_and_llamacpp_bos():
    ids = list(range(10, 33))  # 23 tokens
    w = make_windows(ids, 5, "gptq", bos_id=1)
    assert w.shape == (4, 5) and w[1].tolist() == [15, 16, 17, 18, 19]
    w = make_windows(ids, 5, "llamacpp", bos_id=1)
    assert w[:, 0].tolist() == [1, 1, 1, 1] and w[1, 1:].tolist() == [16, 17, 18, 19]
    with pytest.raises(InvalidArgumentError):
        make_windows(ids, 64, "gptq", None)


def test_llamacpp_scores_second_half(llm_bf16, wiki_ids):
    a = evaluate_perplexity(llm_bf16, wiki_ids, 64, protocol="llamacpp", nsamples=4, progress=False)
    b = evaluate_perplexity(llm_bf16, wiki_ids, 64, protocol="gptq", nsamples=4, progress=False)
    assert a.tokens_scored == 4 * 31 and b.tokens_scored == 4 * 63
    assert a.ppl < b.ppl  # every scored token sees >= 32 tokens of context


def test_batching_does_not_change_the_result(llm_fp32, wiki_ids):
    one = evaluate_perplexity(llm_fp32, wiki_ids, 64, nsamples=6, batch_tokens=64, progress=False)
    many = evaluate_perplexity(llm_fp32, wiki_ids, 64, nsamples=6, batch_tokens=4096, progress=False)
    assert abs(one.ppl / many.ppl - 1) < 1e-5


def test_cli_table_and_json(capsys, tmp_path, data_dir):
    rc = main(["perplexity", "--data", "ptb", "--data-dir", str(data_dir), "--seqlen", "64", "128",
               "--nsamples", "2", "--no-progress", "--cache-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0
    assert "| Model" in out and "| 64 " in out and "| 128 " in out and "SmolLM2-135M-Instruct" in out
    rc = main(["perplexity", "--data", "ptb", "--data-dir", str(data_dir), "--seqlen", "64", "--nsamples", "2",
               "--json", "--cache-dir", str(tmp_path)])
    res = json.loads(capsys.readouterr().out)["results"]
    assert rc == 0 and res[0]["seqlen"] == 64 and res[0]["windows"] == 2 and res[0]["ppl"] > 1


def test_cli_bad_input_exits_2(capsys, tmp_path):
    assert main(["perplexity", "--data", str(tmp_path / "missing.txt"), "--no-cache"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error" in err
