"""The CLI verbs: generate (argument, stdin, --chat, --json), the chat REPL, demo; end-to-end runs of the real
default model; and the peak memory of loading it."""

from __future__ import annotations

import copy
import gc
import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import edgellm
import edgellm.api
import edgellm.cli
from edgellm.cli import DEMO_PROMPTS, TIMING_HEADERS, main
from edgellm.kernels import cpu

PROMPT = "the quick brown fox"
JSON_KEYS = {"text", "prompt_tokens", "new_tokens", "total_s", "prefill_ms", "time_per_token_ms", "tokens_per_s"}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: 1 thread, restored after the module




@pytest.fixture
def captured_llms(monkeypatch: pytest.MonkeyPatch) -> list[edgellm.LLM]:
    """Every LLM the CLI loads, for checks against the API."""
    loaded: list[edgellm.LLM] = []
    real = edgellm.cli.load_from_args

    def spy(args: Any) -> edgellm.LLM:
        loaded.append(real(args))
        return loaded[-1]

    monkeypatch.setattr(edgellm.cli, "load_from_args", spy)
    return loaded


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "Traceback" not in err
    return out


def table(text: str) -> tuple[list[str], list[list[str]]]:
    """The timing table printed by `demo`."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert set(lines[1]) <= set("|-: ")
    return header, [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]


# ---------------------------------------------------------------------------------------------- generate
def test_generate_prompt_argument(capsys: pytest.CaptureFixture[str], tiny: edgellm.LLM, tiny_path: str) -> None:
    out = run(capsys, "generate", "--model", tiny_path, "--dtype", "fp32", "-n", "10", PROMPT)
    expected = tiny.generate(PROMPT, max_new_tokens=10)
    assert expected and out == expected + "\n"
    out = run(capsys, "generate", "--model", tiny_path, "--dtype", "fp32", "-n", "10", "-t", "0.8", "--seed", "3",
              "--top-k", "50", "--top-p", "0.9", "--min-p", "0.01", "--repetition-penalty", "1.1", PROMPT)
    assert out == tiny.generate(PROMPT, max_new_tokens=10, temperature=0.8, seed=3, top_k=50, top_p=0.9,
                                min_p=0.01, repetition_penalty=1.1) + "\n"


def test_program_run_freezes_gc_before_exit(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                            tiny_path: str) -> None:
    """As the program (no argv), main() freezes the GC so interpreter shutdown skips the cyclic collection
    (~1 s with torch's compiler stack loaded); a caller passing arguments keeps its GC untouched."""
    argv = ["generate", "--model", tiny_path, "--dtype", "fp32", "--no-compile", "-n", "2", PROMPT]
    gc.unfreeze()
    try:
        assert main(argv) == 0 and gc.get_freeze_count() == 0
        monkeypatch.setattr(sys, "argv", ["edgellm", *argv])
        assert main() == 0 and gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
    capsys.readouterr()


@pytest.mark.parametrize("stdin_arg", [[], ["-"]])
def test_generate_reads_stdin(stdin_arg: list[str], capsys: pytest.CaptureFixture[str], tiny: edgellm.LLM,
                              tiny_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(PROMPT + "\n"))
    out = run(capsys, "generate", "--model", tiny_path, "--dtype", "fp32", "-n", "8", *stdin_arg)
    assert out == tiny.generate(PROMPT, max_new_tokens=8) + "\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\nworld\n"))  # inner newlines are kept
    out = run(capsys, "generate", "--model", tiny_path, "--dtype", "fp32", "-n", "8", *stdin_arg)
    assert out == tiny.generate("hello\nworld", max_new_tokens=8) + "\n"


def test_generate_chat(capsys: pytest.CaptureFixture[str], tiny: edgellm.LLM, tiny_path: str) -> None:
    out = run(capsys, "generate", "--model", tiny_path, "--dtype", "fp32", "-n", "8", "--chat", "hello there")
    expected = tiny.chat([{"role": "user", "content": "hello there"}], max_new_tokens=8)
    assert out == expected + "\n"
    assert expected != tiny.generate("hello there", max_new_tokens=8)  # the template made a difference


def test_generate_json(capsys: pytest.CaptureFixture[str], tiny: edgellm.LLM, tiny_path: str) -> None:
    out = run(capsys, "generate", "--model", tiny_path, "--dtype", "fp32", "-n", "9", "--json", PROMPT)
    assert out.count("\n") == 1
    obj = json.loads(out)
    assert JSON_KEYS <= set(obj)
    assert obj["text"] == tiny.generate(PROMPT, max_new_tokens=9)
    assert obj["prompt_tokens"] == len(tiny.tokenizer.encode(PROMPT))
    assert obj["new_tokens"] == tiny.last_stats.new_tokens
    assert 0 < obj["new_tokens"] <= 9
    for key in ("total_s", "prefill_ms", "time_per_token_ms", "tokens_per_s"):
        assert isinstance(obj[key], float) and obj[key] > 0, key
    assert obj["tokens_per_s"] == pytest.approx(1000 / obj["time_per_token_ms"])
    assert obj["total_s"] * 1000 > obj["prefill_ms"]


def test_generate_stop(capsys: pytest.CaptureFixture[str], tiny: edgellm.LLM, tiny_path: str) -> None:
    full = tiny.generate(PROMPT, max_new_tokens=20)
    stop = full[3:6]
    out = run(capsys, "generate", "--model", tiny_path, "--dtype", "fp32", "-n", "20", "--json", "--stop", stop,
              "--stop", "\x01", PROMPT)
    obj = json.loads(out)
    assert obj["text"] == full[:full.find(stop)]
    assert obj["finish_reason"] == "stop"


# ---------------------------------------------------------------------------------------------- chat REPL
def test_chat_repl_uses_history_and_reset(capsys: pytest.CaptureFixture[str], tiny: edgellm.LLM, tiny_path: str,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[list[dict[str, Any]]] = []
    real = edgellm.api.LLM.stream_chat

    def spy(self: edgellm.LLM, messages: list[dict[str, Any]], **kw: Any) -> Iterator[str]:
        calls.append(copy.deepcopy(messages))
        return real(self, messages, **kw)

    monkeypatch.setattr(edgellm.api.LLM, "stream_chat", spy)
    lines = ["hello", "", "the fox", "/reset", "lazy dog", "/exit", "never sent"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(lines) + "\n"))
    out = run(capsys, "chat", "--model", tiny_path, "--dtype", "fp32", "-n", "6", "--system", "be brief")
    system = {"role": "system", "content": "be brief"}
    assert len(calls) == 3  # the empty line is skipped, /exit stops before "never sent"
    first = tiny.chat([system, {"role": "user", "content": "hello"}], max_new_tokens=6)
    assert calls[0] == [system, {"role": "user", "content": "hello"}]
    assert calls[1] == [system, {"role": "user", "content": "hello"}, {"role": "assistant", "content": first},
                        {"role": "user", "content": "the fox"}]
    assert calls[2] == [system, {"role": "user", "content": "lazy dog"}]
    second = tiny.chat(calls[1], max_new_tokens=6)
    third = tiny.chat(calls[2], max_new_tokens=6)
    assert second != tiny.chat([system, {"role": "user", "content": "the fox"}], max_new_tokens=6)
    body = out.split("\n", 1)[1]  # after the banner
    assert body == f"{first}\n{second}\n(conversation cleared)\n{third}\n"


def test_chat_repl_ends_at_eof_and_survives_context_overflow(capsys: pytest.CaptureFixture[str], tiny_path: str,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("the " * 300 + "\nhello\n"))
    out = run(capsys, "chat", "--model", tiny_path, "-n", "4")
    assert "error: prompt is" in out and "context" in out and "(try /reset)" in out
    assert out.count("\n") >= 3  # banner, error, the answer to "hello", and the newline at EOF


# ---------------------------------------------------------------------------------------------- demo
def test_demo_table(capsys: pytest.CaptureFixture[str], tiny: edgellm.LLM, tiny_path: str) -> None:
    out = run(capsys, "demo", "--model", tiny_path, "--dtype", "fp32", "-n", "5")
    for prompt in DEMO_PROMPTS:
        assert f"Prompt: {prompt}\n" in out
    assert out.count("Response: ") == 3
    header, rows = table(out)
    assert header == TIMING_HEADERS == ["Example#", "Prompt Length (tokens)", "New Tokens Generated",
                                        "Total Time (s)", "Prefill Phase (ms)", "Time/Token (ms)", "Tokens/Sec"]
    assert [r[0] for r in rows] == ["1", "2", "3"]
    for prompt, row in zip(DEMO_PROMPTS, rows, strict=True):
        assert int(row[1]) == len(tiny.chat_prompt_ids([{"role": "user", "content": prompt}]))
        assert 0 <= int(row[2]) <= 5
        total_s, prefill_ms = float(row[3]), float(row[4])
        assert 0 < prefill_ms < total_s * 1000


# ---------------------------------------------------------------------------------------------- the real default model
def test_default_model_answers(capsys: pytest.CaptureFixture[str], captured_llms: list[edgellm.LLM]) -> None:
    # not the bare "What is the capital of France?": its first token is a near-tie ("The" vs "L", within 0.25 in
    # bf16 logits) that the CPU paths' prefill numerics (int8 activations or not) decide differently
    question = "What is the capital of France? Answer in one sentence."
    out = run(capsys, "generate", "--chat", "--json", "-n", "16", question)
    obj = json.loads(out)
    assert "Paris" in obj["text"]
    assert JSON_KEYS <= set(obj) and obj["finish_reason"] in ("eos", "length")
    llm = captured_llms[0]
    auto = {"bf16": torch.bfloat16, "fp32": torch.float32}[cpu.auto_dtype()]  # fp32 on AVX2 CPUs
    assert llm.loaded.format == "gguf" and llm.dtype == auto
    assert obj["prompt_tokens"] == len(llm.chat_prompt_ids([{"role": "user", "content": question}]))


def test_default_model_demo(capsys: pytest.CaptureFixture[str], captured_llms: list[edgellm.LLM]) -> None:
    out = run(capsys, "demo", "-n", "6")
    header, rows = table(out)
    assert header == TIMING_HEADERS and len(rows) == 3
    llm = captured_llms[0]
    for prompt, row in zip(DEMO_PROMPTS, rows, strict=True):
        assert f"Prompt: {prompt}\n" in out
        assert int(row[1]) == len(llm.chat_prompt_ids([{"role": "user", "content": prompt}]))
        assert int(row[2]) == 6  # none of the three answers ends within 6 tokens
        assert float(row[6]) == pytest.approx(1000 / float(row[5]), rel=1e-3)
    answers = [line for line in out.splitlines() if line.startswith("Response: ")]
    assert all(len(a) > len("Response: ") + 5 for a in answers)


def _run(*argv: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "edgellm", *argv], input=stdin, capture_output=True, text=True,
                          env=env, timeout=120)


def test_subprocess_generate_from_stdin(tiny: edgellm.LLM, tiny_path: str) -> None:
    proc = _run("generate", "--model", tiny_path, "--dtype", "fp32", "-n", "8", "--json", stdin=PROMPT + "\n")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["text"] == tiny.generate(PROMPT, max_new_tokens=8)


RSS_CHILD = r"""
import json
import torch, edgellm

def status_bytes(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))

before = status_bytes("VmRSS")
llm = edgellm.load(dtype="bf16")
# VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so a child of a big pytest process would
# report its parent's peak.
peak = status_bytes("VmHWM")
weights = {p.data_ptr(): p.numel() * p.element_size() for p in llm.model.parameters()}
print(json.dumps({"before": before, "peak": peak, "weights": sum(weights.values()),
                  "dtypes": sorted({str(p.dtype) for p in llm.model.parameters()})}))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmRSS from /proc (Linux)")
def test_peak_rss_of_loading_the_default_model() -> None:
    """Loading streams tensor by tensor: the peak RSS increase stays within 2.5x the bf16 weights."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", RSS_CHILD], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    assert r["dtypes"] == ["torch.bfloat16"]
    assert 200e6 < r["weights"] < 300e6  # SmolLM2-135M: 134.5M parameters x 2 bytes (embedding tied)
    ratio = (r["peak"] - r["before"]) / r["weights"]
    assert ratio <= 2.5, f"peak RSS grew {ratio:.2f}x the bf16 weights while loading ({r})"
