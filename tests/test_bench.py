"""`edgellm bench` on tiny models: the seeds' table columns, the summary, JSON/CSV and peers."""

from __future__ import annotations

import json

import pytest

from edgellm import cli
from edgellm.bench import TIMING_HEADERS, benchmark_text, prompt_of_length

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: 1 thread, restored after the module


def run(args, capsys):
    code = cli.main(["bench", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_table_has_the_seed_columns(tiny_checkpoints, capsys):
    code, out, _ = run(["--model", str(tiny_checkpoints["llama"]), "--dtype", "fp32", "--task", "benchmark_exact",
                        "--prompt-len", "16", "32", "--new-tokens", "5", "--threads", "1", "--no-compile"], capsys)
    assert code == 0
    header = "| " + " | ".join(TIMING_HEADERS) + " |"
    assert header.replace(" ", "") in out.replace(" ", "")
    rows = [line for line in out.splitlines() if line.startswith("|") and line.split("|")[1].strip().isdigit()]
    assert [int(r.split("|")[2]) for r in rows[:2]] == [16, 32]
    assert all(int(r.split("|")[3]) == 5 for r in rows[:2])
    assert "pp512" in out and "tg128" in out and "peak RSS" in out


def test_json_and_transformers_peer(tiny_checkpoints, capsys):
    pytest.importorskip("transformers")
    code, out, _ = run(["--model", str(tiny_checkpoints["qwen2"]), "--dtype", "fp32", "--task", "benchmark_exact",
                        "--prompt-len", "24", "--new-tokens", "4", "--threads", "1", "--no-compile", "--json",
                        "--peer", "transformers"], capsys)
    assert code == 0
    data = json.loads(out)
    engines = [r["engine"] for r in data["results"]]
    assert engines[0].startswith("edgellm") and engines[1] == "transformers"
    for r in data["results"]:
        assert r["rows"][0]["prompt_tokens"] == 24 and r["rows"][0]["new_tokens"] == 4
        assert len(r["pp512"]) >= 3 and all(v > 0 for v in r["tg128"])


def test_llamacpp_peer_needs_gguf(tiny_checkpoints, capsys):
    code, out, err = run(["--model", str(tiny_checkpoints["llama"]), "--dtype", "fp32", "--prompt-len", "8",
                          "--task", "benchmark_exact", "--new-tokens", "2", "--threads", "1", "--no-compile",
                          "--peer", "llamacpp"], capsys)
    assert code == 0
    assert "skipped" in err and "llama.cpp" not in out.split("Summary")[-1]


def test_profile_breakdown(tiny_checkpoints, capsys):
    code, out, _ = run(["--model", str(tiny_checkpoints["llama"]), "--dtype", "fp32", "--task", "profile",
                        "--prompt-len", "32", "--new-tokens", "4", "--threads", "1", "--no-compile"], capsys)
    assert code == 0
    for part in ("attention", "mlp", "norm", "lm_head", "sampling"):
        assert f"| {part}" in out


def test_csv(tiny_checkpoints, capsys):
    code, out, _ = run(["--model", str(tiny_checkpoints["llama"]), "--dtype", "fp32", "--task", "benchmark_exact",
                        "--prompt-len", "8", "--new-tokens", "3", "--threads", "1", "--no-compile", "--csv"], capsys)
    assert code == 0
    lines = out.strip().splitlines()
    assert lines[0] == ",".join(["engine"] + TIMING_HEADERS)
    assert lines[1].split(",")[2] == "8"


def test_prompts_are_cut_from_real_text():
    text = benchmark_text()
    ids = list(range(100))
    assert prompt_of_length(ids, 10, offset=5) == list(range(5, 15))
    with pytest.raises(ValueError):
        prompt_of_length(ids, 200)
    assert len(text) > 10_000
