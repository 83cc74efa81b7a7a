"""Never lose work: a run killed midway (kill -9 / Ctrl-C) resumes and ends with the same numbers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from edgellm.eval.cache import ResultStore
from edgellm.eval.data import load_corpus
from edgellm.eval.engine import Runner
from edgellm.eval.mmlu import evaluate_mmlu
from edgellm.eval.perplexity import evaluate_perplexity

SEQLEN, N = 64, 48


def test_kill_9_then_resume_gives_the_same_perplexity(tmp_path, llm_bf16, data_dir):
    cache = tmp_path / "cache"
    cmd = [sys.executable, "-m", "edgellm", "perplexity", "--data", "wikitext2", "--data-dir", str(data_dir),
           "--seqlen", str(SEQLEN), "--nsamples", str(N), "--batch-tokens", str(SEQLEN), "--dtype", "bf16",
           "--json", "--no-progress", "--cache-dir", str(cache)]
    log = cache / "perplexity.jsonl"
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}  # no spinning threads on a busy machine
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if log.is_file() and log.read_bytes().count(b"\n") >= 5:
                break
            time.sleep(0.02)
        if proc.poll() is not None:
            pytest.fail("the run finished before it could be killed")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    done = log.read_bytes().count(b"\n")
    assert 5 <= done < N
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
    resumed = json.loads(out)["results"][0]
    assert log.read_bytes().count(b"\n") == N  # only the missing windows were added

    ids = llm_bf16.tokenizer.encode(load_corpus("wikitext2", data_dir=data_dir).text)
    fresh = evaluate_perplexity(llm_bf16, ids, SEQLEN, nsamples=N, batch_tokens=SEQLEN, progress=False)
    assert resumed["windows"] == N and resumed["tokens_scored"] == fresh.tokens_scored
    assert resumed["ppl"] == pytest.approx(fresh.ppl, rel=1e-9)


def test_interrupted_mmlu_resumes_to_the_same_result(tmp_path, llm_bf16, data_dir, monkeypatch):
    kwargs = dict(shot=1, subjects=["anatomy", "marketing"], limit=6, data_dir=data_dir, batch_tokens=256,
                  progress=False, details=True)
    fresh = evaluate_mmlu(llm_bf16, store=ResultStore(None, "m"), **kwargs)

    calls = {"n": 0}
    original = Runner._run_batch

    def flaky(self, reqs, lcp):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(self, reqs, lcp)

    monkeypatch.setattr(Runner, "_run_batch", flaky)
    with pytest.raises(KeyboardInterrupt):
        evaluate_mmlu(llm_bf16, store=ResultStore(tmp_path, "mmlu"), **kwargs)
    partial = len(ResultStore(tmp_path, "mmlu"))
    assert 0 < partial < 12
    monkeypatch.setattr(Runner, "_run_batch", original)
    resumed = evaluate_mmlu(llm_bf16, store=ResultStore(tmp_path, "mmlu"), **kwargs)
    assert resumed.questions == fresh.questions
    assert (resumed.macro, resumed.micro) == (fresh.macro, fresh.micro)
    stored = ResultStore(tmp_path, "mmlu").values
    assert len(stored) == 12
