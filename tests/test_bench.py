"""`edgellm bench` on tiny models: the seeds' table columns, the summary, JSON/CSV and peers."""

from __future__ import annotations

import json

import pytest

from edgellm import cli
from edgellm.bench import TIMING_HEADERS, benchmark_text, leading_ids, prompt_of_length

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


def test_prompt_ids_come_from_a_prefix_and_equal_the_whole_texts(default_gguf):
    """The bench tokenizes only as much text as its prompts need (the whole of WikiText-2 test cost ~180 MB
    of peak RSS), and gets the same ids as tokenizing everything."""
    from edgellm.tokenizer import Tokenizer

    tok = _default_tokenizer(default_gguf)
    text = benchmark_text()[:200_000]
    whole = tok.encode(text)
    for need in (16, 1512, 5512):
        part = leading_ids(tok, text, need)
        assert len(part) >= need and part[:need] == whole[:need]
        assert len(part) < len(whole)                                 # really only a prefix
    assert leading_ids(tok, "short text\nof two lines", 1000) == tok.encode("short text\nof two lines")
    assert isinstance(tok, Tokenizer)


def _default_tokenizer(path):
    from edgellm.loading.gguf_file import GGUFCheckpoint
    from edgellm.tokenizer import Tokenizer

    return Tokenizer.from_gguf_metadata(GGUFCheckpoint(path).metadata)


class FakeSession:
    """Records the order in which run_interleaved drives the engines."""

    def __init__(self, name: str, calls: list, fail_at: str | None = None) -> None:
        self.name = self.peer = name
        self.calls, self.fail_at = calls, fail_at

    def _do(self, what: str) -> None:
        if what == self.fail_at:
            from edgellm.bench import PeerFailed

            raise PeerFailed("boom")
        self.calls.append((self.name, what))

    def warmup(self):
        self._do("warmup")

    def row(self, i):
        from edgellm.peers import Row

        self._do(f"row{i}")
        return Row(i + 1, 8, 2, 0.1, 10.0, 5.0, 200.0)

    def summary_round(self):
        self._do("summary")
        return 100.0, 50.0

    def finish(self):
        from edgellm.peers import BenchResult

        self._do("finish")
        return BenchResult(self.name, "benchmark_exact")


def test_engines_are_interleaved_and_a_failing_peer_is_dropped():
    from edgellm.bench import run_interleaved

    calls, notes = [], []
    job = {"prompts": [[1] * 8, [2] * 8], "repeat": 1}
    sessions = [FakeSession("ours", calls), FakeSession("peer", calls), FakeSession("bad", calls, fail_at="row1")]
    results = run_interleaved(sessions, job, notes.append)
    assert calls[:7] == [("ours", "warmup"), ("peer", "warmup"), ("bad", "warmup"), ("ours", "row0"),
                         ("peer", "row0"), ("bad", "row0"), ("ours", "row1")]
    assert calls[7:] == [("peer", "row1")] + [("ours", "summary"), ("peer", "summary")] * 3 + \
        [("ours", "finish"), ("peer", "finish")]
    assert [r.engine for r in results] == ["ours", "peer"]
    assert any("peer bad failed (boom); dropped" in n for n in notes)


def test_a_peer_that_crashes_is_skipped_with_its_error(tmp_path):
    pytest.importorskip("transformers")
    from edgellm.bench import start_peer

    notes = []
    job = {"task": "decode", "prompts": [[1, 2]], "pp_prompt": [1], "tg_prompt": [1], "new_tokens": 2, "repeat": 1,
           "max_context": 64, "threads": 1, "n_ctx": 16, "model_path": str(tmp_path / "missing"), "dtype": "float32"}
    assert start_peer("transformers", job, notes.append) is None
    assert notes[-1].startswith("note: peer transformers failed (") and len(notes[-1].splitlines()) == 1


def test_serve_task_drives_a_real_server(capsys):
    """`bench --task serve` starts `edgellm serve` as a process and measures streams (tiny settings)."""
    pytest.importorskip("fastapi")
    assert cli.main(["bench", "--task", "serve", "--streams", "1", "2", "--new-tokens", "4", "--repeat", "1",
                     "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    (ours,) = out["engines"]
    assert not ours["error"] and [s["streams"] for s in ours["summaries"]] == [1, 2]
    assert all(s["failed"] == 0 and s["tokens_per_s"] > 0 for s in ours["summaries"])
    assert out["goal"] is None and "cpu_path" in out  # the goal is judged at 8 streams, not run here


def test_serve_task_passes_lookup_speculation_to_our_server(capsys):
    from edgellm.bench_serve import ours_command

    assert ours_command("m.gguf", 8000, 4, 256, 2, "lookup")[-2:] == ["--speculative", "lookup"]
    assert "--speculative" not in ours_command("m.gguf", 8000, 4, 256, 2)
    assert cli.main(["bench", "--task", "serve", "--speculative", "self", "--streams", "1"]) == 2
    assert "--speculative lookup" in capsys.readouterr().err
