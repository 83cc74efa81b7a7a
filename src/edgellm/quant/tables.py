"""Reproduce the accuracy / size / memory tables of docs/QUANTIZATION.md (the seeds' layout).

    python -m edgellm.quant.tables --work /tmp/quant_out            # resumable; results in WORK/results.json
    python -m edgellm.quant.tables --work /tmp/quant_out --markdown # print the tables from the results

Columns: float (the bundled model in bf16), RTN w4 g32, RTN w4 g128, AWQ g128, AWQ+ g128. The quantized
columns are read back from the checkpoints `edgellm quantize` writes (WORK/<column>/), so the numbers are
those of the files users get. Perplexity uses edgellm.eval (gptq protocol: non-overlapping windows);
each cell scores the first `max(4, budget / seqlen)` windows of the test split.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

COLUMNS = {  # name -> quantize arguments (None: the float model)
    "float": None,
    "w4 g32": ["--algorithm", "rtn", "--w-bit", "4", "--group-size", "32"],
    "w4 g128": ["--algorithm", "rtn", "--w-bit", "4", "--group-size", "128"],
    "AWQ g128": ["--algorithm", "awq", "--w-bit", "4", "--group-size", "128"],
    "AWQ+ g128": ["--algorithm", "awqplus", "--w-bit", "4", "--group-size", "128"],
}
SEQLENS = [16, 96, 192, 256, 512, 768, 1024, 1536, 2048]
DATASETS = ["wikitext2", "ptb"]
BIG_BUDGET_SEQLENS = (512, 2048)   # the acceptance rows get more tokens
PROMPT = "What is the meaning of life?"


def folder_name(column: str) -> str:
    return column.replace(" ", "_").replace("+", "plus").lower()


def load_column(work: Path, column: str, dtype: str = "bf16"):
    import edgellm

    from .checkpoint import load_quantized_llm

    if COLUMNS[column] is None:
        return edgellm.load(None, dtype=dtype)
    return load_quantized_llm(work / folder_name(column), dtype=dtype)


def ensure_checkpoints(work: Path, log) -> None:
    from .__main__ import main as quant_main

    cache = work / "awq-cache"
    for column, args in COLUMNS.items():
        out = work / folder_name(column)
        if args is None or (out / "config.json").is_file():
            continue
        log(f"== quantizing {column} -> {out}")
        t = time.perf_counter()
        rc = quant_main(["quantize", *args, "--out", str(out), "--cache-dir", str(cache)])
        if rc:
            raise SystemExit(rc)
        (out / "quantize_seconds.txt").write_text(f"{time.perf_counter() - t:.1f}\n")


def ppl_key(column: str, data: str, seqlen: int, budget: int, big_budget: int) -> str:
    tokens = big_budget if seqlen in BIG_BUDGET_SEQLENS else budget
    return f"ppl|{column}|{data}|{seqlen}|{tokens}"


def run_perplexity(work: Path, results: dict, save, log, budget: int, big_budget: int) -> None:
    from ..eval.data import load_corpus
    from ..eval.perplexity import evaluate_perplexity

    for column in COLUMNS:
        llm = None
        for data in DATASETS:
            ids = None
            for seqlen in SEQLENS:
                tokens = big_budget if seqlen in BIG_BUDGET_SEQLENS else budget
                key = ppl_key(column, data, seqlen, budget, big_budget)
                if key in results:
                    continue
                if llm is None:
                    llm = load_column(work, column)
                if ids is None:
                    ids = llm.tokenizer.encode(load_corpus(data, split="test").text)
                n = min(len(ids) // seqlen, max(4, math.ceil(tokens / seqlen)))
                r = evaluate_perplexity(llm, ids, seqlen, nsamples=n, progress=False, data=data)
                results[key] = {"ppl": r.ppl, "windows": r.windows, "tokens": r.tokens_scored, "wall_s": r.wall_s}
                log(f"{column:10s} {data:9s} seqlen {seqlen:5d}: PPL {r.ppl:.3f} ({r.windows} windows, "
                    f"{r.wall_s:.0f} s)")
                save()


def run_mmlu(work: Path, results: dict, save, log, limit: int) -> None:
    from ..eval.mmlu import evaluate_mmlu

    for column in COLUMNS:
        key = f"mmlu|{column}|{limit}"
        if key in results:
            continue
        r = evaluate_mmlu(load_column(work, column), shot=0, limit=limit, progress=False)
        results[key] = {"macro": r.macro, "micro": r.micro, "correct": r.correct, "total": r.total}
        log(f"{column:10s} MMLU 0-shot ({r.total} questions): {100 * r.micro:.2f}")
        save()


def rss_child(work: Path, column: str) -> dict[str, float]:
    """Run in a fresh process: load, generate 60 tokens; peak RSS of the generation, and of the whole run."""
    import edgellm  # noqa: F401

    def status(field: str) -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
        return math.nan

    from ..config import ModelConfig
    from ..loading import meta_transformer

    # pay the one-time cost of building a module tree on the meta device before the baseline
    meta_transformer(ModelConfig(num_layers=1, hidden_size=64, intermediate_size=64, num_heads=1, num_kv_heads=1,
                                 head_dim=64, vocab_size=64))
    base = status("VmRSS")
    llm = load_column(work, column)
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in [*llm.model.parameters(), *llm.model.buffers()]}
    loaded = status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")   # reset the peak (VmHWM) to the current RSS
    llm.generate(PROMPT, max_new_tokens=60, ignore_eos=True)
    peak = status("VmHWM")
    llm.generate(PROMPT, max_new_tokens=60, ignore_eos=True)  # again, warm, for the timing
    return {"baseline_mb": base, "after_load_mb": loaded, "peak_generate_mb": peak,
            "peak_process_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "ms_per_token": llm.last_stats.time_per_token_ms, "tensors_mb": sum(storages.values()) / 2 ** 20}


def run_rss(work: Path, results: dict, save, log, threads: int | None) -> None:
    for column in COLUMNS:
        key = f"rss|{column}"
        if key in results:
            continue
        extra = ["--threads", str(threads)] if threads else []
        out = subprocess.run([sys.executable, "-m", "edgellm.quant.tables", "--work", str(work), *extra,
                              "--rss-child", column], capture_output=True, text=True, check=True)
        results[key] = json.loads(out.stdout.strip().splitlines()[-1])
        log(f"{column:10s} peak RSS while generating: {results[key]['peak_generate_mb']:.0f} MB")
        save()


def disk_mb(work: Path, column: str) -> float | None:
    if COLUMNS[column] is None:
        return None
    return sum(f.stat().st_size for f in (work / folder_name(column)).glob("*.safetensors")) / 1e6


def markdown(work: Path, results: dict, mmlu_limit: int, budget: int, big_budget: int) -> str:
    from ..report import markdown_table

    cols = list(COLUMNS)
    lines = []
    for data, title in (("wikitext2", "WikiText-2 test"), ("ptb", "PTB test")):
        rows = []
        for s in SEQLENS:
            cells = [results.get(ppl_key(c, data, s, budget, big_budget), {}).get("ppl") for c in cols]
            rows.append([s] + [f"{v:.3f}" if v is not None else "" for v in cells])
        lines += [f"**{title} perplexity**", "", markdown_table(["Seqlen"] + cols, rows), ""]
    rows = []
    mm = [results.get(f"mmlu|{c}|{mmlu_limit}") for c in cols]
    if any(mm):
        total = next(m["total"] for m in mm if m)
        rows.append([f"MMLU 0-shot (%; {total} questions)"] + [f"{100 * m['micro']:.2f}" if m else "" for m in mm])
    rows.append(["size on disk (MB)"] + [f"{disk_mb(work, c):.1f}" if disk_mb(work, c) else "" for c in cols])
    rss = [results.get(f"rss|{c}") for c in cols]
    if any(rss):
        rows.append(["peak RSS generating (MB)"] + [f"{r['peak_generate_mb']:.0f}" if r else "" for r in rss])
        rows.append(["  above the torch baseline (MB)"] + [f"{r['peak_generate_mb'] - r['baseline_mb']:.0f}"
                                                            if r else "" for r in rss])
        rows.append(["  weights and buffers (MB)"] + [f"{r['tensors_mb']:.0f}" if r and "tensors_mb" in r else ""
                                                      for r in rss])
        rows.append(["decode ms/token (eager)"] + [f"{r['ms_per_token']:.1f}" if r and "ms_per_token" in r else ""
                                                   for r in rss])
    lines += [markdown_table([""] + cols, rows), ""]
    gap_rows = []
    for data in DATASETS:
        for s in BIG_BUDGET_SEQLENS:
            f, rtn, awq, plus = (results.get(ppl_key(c, data, s, budget, big_budget), {}).get("ppl")
                                 for c in ("float", "w4 g128", "AWQ g128", "AWQ+ g128"))
            if None not in (f, rtn, awq, plus):
                gap_rows.append([data, s, f"{f:.3f}", f"{rtn:.3f}", f"{awq:.3f}", f"{plus:.3f}",
                                 f"{(awq - f) / (rtn - f):.2f}", f"{(plus - f) / (rtn - f):.2f}"])
    if gap_rows:
        lines += ["**AWQ vs RTN at w4 g128: gap ratio (AWQ - float) / (RTN - float)**", "",
                  markdown_table(["data", "seqlen", "float", "RTN w4 g128", "AWQ", "AWQ+", "AWQ gap ratio",
                                  "AWQ+ gap ratio"], gap_rows)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m edgellm.quant.tables", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", required=True, type=Path, help="checkpoints and results.json live here")
    p.add_argument("--budget", type=int, default=8192, help="tokens scored per perplexity cell")
    p.add_argument("--big-budget", type=int, default=32768, help="tokens per cell at seqlen 512 and 2048")
    p.add_argument("--mmlu-limit", type=int, default=10, help="MMLU test questions per subject")
    p.add_argument("--skip", nargs="*", default=[], choices=["ppl", "mmlu", "rss"])
    p.add_argument("--markdown", action="store_true", help="only print the tables from results.json")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.rss_child:
        print(json.dumps(rss_child(args.work, args.rss_child)))
        return 0
    args.work.mkdir(parents=True, exist_ok=True)
    path = args.work / "results.json"
    results: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}

    def save() -> None:
        path.write_text(json.dumps(results, indent=1))

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    if not args.markdown:
        ensure_checkpoints(args.work, log)
        if "ppl" not in args.skip:
            run_perplexity(args.work, results, save, log, args.budget, args.big_budget)
        if "mmlu" not in args.skip:
            run_mmlu(args.work, results, save, log, args.mmlu_limit)
        if "rss" not in args.skip:
            run_rss(args.work, results, save, log, args.threads)
    print(markdown(args.work, results, args.mmlu_limit, args.budget, args.big_budget))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
