"""`edgellm bench`: the seeds' timing tables (decode / benchmark / benchmark_exact / profile), a llama-bench
style summary (pp512, tg128), load time, peak RSS, and peers (llama.cpp, transformers) run back to back."""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

from .errors import InvalidArgumentError
from .kernels import cpu, native
from .peers import BenchResult, Engine, Row, Session, median, summary_rounds
from .report import markdown_table

BENCHMARK_LENGTHS = [5, 78, 128, 140, 256, 293, 372, 512, 580, 717, 790, 800, 900, 1024, 1050, 1320, 1537,
                     1580, 1670, 1900, 2048]
EXACT_LENGTHS = [128, 256, 512, 1024, 2048]
DECODE_PROMPTS = [
    "What is the meaning of life?", "Tell me something you don't know.", "What does Xilinx do?",
    "What is the mass of earth?", "What is a poem?", "What is recursion?", "Tell me a one line joke.",
    "Who is Gilgamesh?", "Tell me something about cryptocurrency.", "How did it all begin?",
]
TIMING_HEADERS = ["Example#", "Prompt Length (tokens)", "New Tokens Generated", "Total Time (s)",
                  "Prefill Phase (ms)", "Time/Token (ms)", "Tokens/Sec"]
# Real text for prompts of an exact length; the shared WikiText-2 test split when present.
_TEXT_CANDIDATES = ["../shared/data/wikitext-2-raw/wiki.test.raw", "shared/data/wikitext-2-raw/wiki.test.raw"]


def cpu_model() -> str:
    return cpu.cpu_name()


def physical_cores() -> int:
    try:
        cores = {line.split(":")[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("core id")}
        if cores:
            return len(cores)
    except OSError:
        pass
    return max(1, (torch.get_num_threads() or 1))


def benchmark_text(data: str | None = None) -> str:
    for candidate in ([data] if data else []) + _TEXT_CANDIDATES:
        p = Path(candidate)
        if p.is_file():
            return p.read_text(encoding="utf-8")
    # Fallback when the shared data is absent: varied prose built from the demo prompts.
    return " ".join(f"Question {i}: {p} Answer: a careful explanation follows, with details." for i, p in
                    enumerate(DECODE_PROMPTS * 300))


def leading_ids(tokenizer, text: str, need: int, margin: int = 64) -> list[int]:
    """The token ids of `text` up to at least `need` of them (all of them for a short text), tokenizing only a
    prefix cut at a line break: encoding all of WikiText-2 test (1.3 MB) at once raised the bench process's peak
    RSS by ~180 MB. Tokenization is local (pre-tokens never cross a line break), so with `margin` tokens to spare
    the first `need` ids equal those of the whole text."""
    chars = need * 6 + 4096
    while True:
        cut = len(text) if chars >= len(text) else text.rfind("\n", 0, chars)
        if cut <= 0:
            cut = min(chars, len(text))
        ids = tokenizer.encode(text[:cut])
        if cut >= len(text) or len(ids) >= need + margin:
            return ids
        chars *= 2


def prompt_of_length(ids: list[int], n: int, offset: int = 0) -> list[int]:
    if len(ids) < offset + n:
        raise ValueError(f"benchmark text has only {len(ids)} tokens; need {offset + n}")
    return ids[offset:offset + n]


def mean_sd(xs: list[float]) -> str:
    if not xs:
        return "n/a"
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.mean(xs):.2f} ± {sd:.2f}"


# ------------------------------------------------------------------------------------------------ engines
class EdgeEngine(Engine):
    def __init__(self, llm, compile: bool) -> None:
        from .generate import SamplingParams

        self.llm = llm
        self.params = SamplingParams
        self.compile = compile
        fast = llm.generator.compiled
        kind = "eager" if fast is None else "C step" if fast.native is not None else "compiled"
        self.name = f"edgellm ({kind})"

    def run(self, prompt_ids: list[int], new: int) -> Row:
        gen = self.llm.generator
        for _ in range(2):  # a run that had to compile (or load) the step for a new cache size is run again
            before = gen.compile_s
            t0 = time.perf_counter()
            n = sum(1 for _ in gen.token_stream(prompt_ids, self.params(max_new_tokens=new, ignore_eos=True)))
            total = time.perf_counter() - t0
            self.compile_s = gen.compile_s  # reported on its own in the summary
            if self.compile_s == before:
                break
        s = gen.stats
        self.note = gen.note
        if s.speculative:
            self.note = "; ".join(x for x in (self.note, f"speculative {s.speculative}: acceptance "
                                  f"{s.acceptance_rate:.2f}, {s.mean_accepted:.2f} accepted per round") if x)
        return Row(0, len(prompt_ids), n, total, s.prefill_ms, s.time_per_token_ms, s.tokens_per_s)


# ------------------------------------------------------------------------------------------------ tasks
def task_prompts(task: str, tokenizer, lengths: list[int] | None, data: str | None) -> list[list[int]]:
    if task == "decode":
        return [tokenizer.encode_chat([{"role": "user", "content": p}]) for p in DECODE_PROMPTS]
    if lengths is None:
        lengths = {"benchmark": BENCHMARK_LENGTHS, "benchmark_exact": EXACT_LENGTHS, "profile": [256]}[task]
    ids = leading_ids(tokenizer, benchmark_text(data), max(1000 * i + n for i, n in enumerate(lengths)))
    return [prompt_of_length(ids, n, offset=1000 * i) for i, n in enumerate(lengths)]


def summary_prompts(tokenizer, data: str | None, max_context: int) -> tuple[list[int], list[int]]:
    """llama-bench's prompts: 512 tokens of real text for pp512 (shorter if the context is), 16 for tg128."""
    ids = leading_ids(tokenizer, benchmark_text(data), 5000 + 512)
    prompt = prompt_of_length(ids, min(512, max_context - 8), offset=5000)
    return prompt, prompt[:16]


class PeerFailed(RuntimeError):
    pass


class PeerProcess:
    """A peer's `Session` in a child process (`python peers.py JOB.json`), driven one request at a time, so
    its peak RSS is its own and its timings interleave with ours. Same methods as `Session`."""

    def __init__(self, peer: str, job: dict) -> None:
        import tempfile

        self.peer = peer
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump({**job, "peer": peer}, f)
        self.job_file = Path(f.name)
        self.stderr = tempfile.TemporaryFile("w+")  # a file, not a pipe: a chatty peer cannot block on it
        # Run as a plain script (not `-m edgellm...`): the package's imports (torch) must not count in its RSS.
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("peers.py")), str(self.job_file)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True)
        first = self._read()
        self.skipped = first.get("skipped")
        self.name = first.get("ready", peer)

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.close()
            self.stderr.seek(0)
            err = (self.stderr.read().strip().splitlines() or [f"exit status {self.proc.returncode}"])[-1]
            raise PeerFailed(err)
        return json.loads(line)

    def _ask(self, op: str, **kw) -> dict:
        try:
            self.proc.stdin.write(json.dumps({"op": op, **kw}) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass  # the child is gone: _read reports why
        return self._read()

    def warmup(self) -> None:
        self._ask("warmup")

    def row(self, index: int) -> Row:
        return Row(**self._ask("row", index=index))

    def summary_round(self) -> tuple[float, float]:
        r = self._ask("summary")
        return r["pp"], r["tg"]

    def finish(self) -> BenchResult:
        data = self._ask("finish")
        self.close()
        rows = [Row(**r) for r in data.pop("rows")]
        return BenchResult(rows=rows, **data)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:  # a hung peer is killed rather than waited for
                self.proc.kill()
        self.job_file.unlink(missing_ok=True)


def start_peer(peer: str, job: dict, log: Callable[[str], None]) -> PeerProcess | None:
    log(f"[{peer}] starting in a separate process")
    try:
        proc = PeerProcess(peer, job)
    except PeerFailed as e:
        log(f"note: peer {peer} failed ({e}); skipped")
        return None
    if proc.skipped:
        hint = "; `make bench-peers` installs llama-cpp-python" if peer == "llamacpp" else ""
        log(f"note: peer {peer} skipped ({proc.skipped}{hint})")
        proc.close()
        return None
    return proc


def run_interleaved(sessions: list, job: dict, log: Callable[[str], None]) -> list[BenchResult]:
    """Every timing of every engine, interleaved: each example runs on each engine in turn, then each
    pp512/tg128 round. A peer that fails part-way is dropped with a note; edgellm (first) never is."""
    live = list(sessions)

    def each(step: Callable[[object], None]) -> None:
        for s in list(live):
            try:
                step(s)
            except PeerFailed as e:
                log(f"note: peer {s.peer} failed ({e}); dropped")
                live.remove(s)

    each(lambda s: s.warmup())
    for i, ids in enumerate(job["prompts"]):
        def one_row(s, i=i, ids=ids):
            r = s.row(i)
            log(f"[{s.name}] example {i + 1}/{len(job['prompts'])}: {len(ids)} tokens, "
                f"{r.tokens_per_s:.1f} tok/s, prefill {r.prefill_ms:.0f} ms")
        each(one_row)
    for k in range(summary_rounds(job)):
        def one_round(s, k=k):
            pp, tg = s.summary_round()
            log(f"[{s.name}] pp512/tg128 round {k + 1}: {pp:.0f} / {tg:.1f} t/s")
        each(one_round)
    results = []
    each(lambda s: results.append(s.finish()))
    return results


def profile_breakdown(llm, prompt_ids: list[int], new: int) -> list[list]:
    """Eager per-module wall time (attention, MLP, norm, lm_head, embedding) and sampling, summed over
    prefill and decode. Hooks add a little overhead; shares are what matter."""
    from .generate import SamplingParams
    from .model import MLP, Attention, RMSNorm

    totals: dict[str, float] = {}
    starts: dict[int, float] = {}

    def kind(m: torch.nn.Module) -> str | None:
        if isinstance(m, Attention):
            return "attention"
        if isinstance(m, MLP):
            return "mlp"
        if isinstance(m, RMSNorm):
            return "norm"
        if m is llm.model.lm_head:
            return "lm_head"
        if m is llm.model.embed_tokens:
            return "embedding"
        return None

    handles = []
    for m in llm.model.modules():
        k = kind(m)
        if k is None:
            continue

        def pre(mod, args, _k=k):
            starts[id(mod)] = time.perf_counter()

        def post(mod, args, out, _k=k):
            totals[_k] = totals.get(_k, 0.0) + time.perf_counter() - starts.pop(id(mod))

        handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    gen = llm.generator
    saved = getattr(gen, "compiled", None)
    if saved is not None:
        gen.compiled = None  # hooks need the eager modules
    try:
        t0 = time.perf_counter()
        sum(1 for _ in gen.token_stream(prompt_ids, SamplingParams(max_new_tokens=new, ignore_eos=True)))
        total = time.perf_counter() - t0
    finally:
        for h in handles:
            h.remove()
        if saved is not None:
            gen.compiled = saved
    accounted = sum(totals.values())
    totals["sampling + other"] = max(total - accounted, 0.0)
    return [[k, round(v * 1e3, 2), f"{100 * v / total:.1f}%"] for k, v in totals.items()]


# ------------------------------------------------------------------------------------------------ CLI
def register(sub: argparse._SubParsersAction) -> None:
    from .cli import add_compile_args, add_model_args, add_speculative_args

    p = sub.add_parser("bench", help="prefill/decode timing tables, llama-bench summary, peers")
    add_model_args(p)
    add_compile_args(p)
    p.add_argument("--task", default="decode",
                   choices=["decode", "benchmark", "benchmark_exact", "profile", "speculative", "serve"],
                   help="speculative: the K sweep of every --speculative method on a chat and an input-grounded "
                        "task, against plain decoding; serve: `edgellm serve` under 1..16 concurrent streams "
                        "against llama-cpp-python's server (see bench_serve.py)")
    p.add_argument("--quant", default=None,
                   help="quantize weights before timing, e.g. rtn:w4:g32 (int4 kernels), rtn:w8:g-1 (int8), "
                        "awq:w4:g128; default: the checkpoint's weights in --dtype")
    p.add_argument("--prompt-len", type=int, nargs="+", default=None, help="override the task's prompt lengths")
    p.add_argument("--new-tokens", type=int, default=60)
    p.add_argument("--ignore-eos", action="store_true",
                   help="speculative: decode all --new-tokens past the end of the answer (fixed-length rows); "
                        "default: each answer ends where the model ends it, as users get it")
    p.add_argument("--threads", type=int, default=None, help="default: physical cores")
    p.add_argument("--repeat", type=int, default=1, help="runs per example (medians are reported)")
    p.add_argument("--peer", action="append", default=[], choices=["llamacpp", "transformers"])
    p.add_argument("--data", default=None, help="text file for prompts (default: WikiText-2 test if present)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--csv", action="store_true")
    p.add_argument("--plot", default=None, help="PNG: tokens/s and prefill ms against prompt length")
    add_speculative_args(p, sweep=True)
    from .bench_serve import add_args as add_serve_args

    add_serve_args(p)
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    from .api import LLM
    from .loading import load_model
    from .speculative import build_speculator, target_load_options

    threads = args.threads or physical_cores()
    torch.set_num_threads(threads)
    if args.task == "serve":
        from .bench_serve import run as run_serve

        return run_serve(args)
    if args.task == "speculative":
        from .bench_speculative import run

        return run(args)
    if args.speculative and len(args.speculative) > 1 or args.draft_k and len(args.draft_k) > 1:
        raise InvalidArgumentError("several --speculative methods or --draft-k values need --task speculative")
    log = (lambda s: print(s, file=sys.stderr)) if not args.json else (lambda s: None)
    t0 = time.perf_counter()
    dtype, keep_quantized = target_load_options((args.speculative or [None])[0], args.dtype,
                                                False if args.quant else None)
    loaded = load_model(args.model, dtype=dtype, rope_type=args.rope_type, keep_quantized=keep_quantized,
                        adapter=getattr(args, "adapter", None))
    load_s = time.perf_counter() - t0  # reading the checkpoint into its final dtype/packing, nothing else
    speculator = None
    if args.speculative:
        speculator = build_speculator(args.speculative[0], loaded, k=(args.draft_k or [None])[0],
                                      draft_model=args.draft_model, compile=args.compile)
    llm = LLM(loaded, compile=args.compile, speculator=speculator)
    quant_note = ""
    if args.quant:
        from .quant import quantize_llm

        t1 = time.perf_counter()
        quantize_llm(llm, args.quant)
        quant_note = f"--quant {args.quant}: quantized and packed in {time.perf_counter() - t1:.2f} s after loading"
    prompts = task_prompts(args.task, llm.tokenizer, args.prompt_len, args.data)
    if args.task == "profile":
        prompts = prompts[:1]
    pp_prompt, tg_prompt = summary_prompts(llm.tokenizer, args.data, llm.config.max_seq_len)
    job = {"task": args.task, "prompts": prompts, "pp_prompt": pp_prompt, "tg_prompt": tg_prompt,
           "new_tokens": args.new_tokens, "repeat": args.repeat, "max_context": llm.config.max_seq_len,
           "threads": threads, "n_ctx": max(len(p) for p in prompts) + args.new_tokens + 8,
           "model_path": str(llm.loaded.path), "dtype": str(llm.dtype).removeprefix("torch.")}
    engine = EdgeEngine(llm, args.compile)
    engine.load_s = load_s
    sessions: list = [Session(engine, job)]
    for peer in args.peer:
        if peer == "llamacpp" and llm.loaded.format != "gguf":
            log("note: --peer llamacpp needs a GGUF model; skipped")
            continue
        proc = start_peer(peer, job, log)
        if proc is not None:
            sessions.append(proc)
    try:
        results = run_interleaved(sessions, job, log)
    finally:
        for s in sessions[1:]:
            s.close()
    results[0].note = "; ".join(n for n in (results[0].note, quant_note, native.status()) if n)
    breakdown = profile_breakdown(llm, prompts[0], args.new_tokens) if args.task == "profile" else None
    print_results(args, results, threads, breakdown)
    if args.plot:
        plot(results, args.plot)
    return 0


def print_results(args: argparse.Namespace, results: list[BenchResult], threads: int,
                  breakdown: list[list] | None) -> None:
    meta = {"cpu": cpu_model(), "cpu_path": cpu.summary(), "paths": cpu.paths(), "threads": threads,
            "torch": torch.__version__, "task": args.task}
    if args.json:
        print(json.dumps({**meta, "results": [asdict(r) for r in results], "profile": breakdown}, indent=2))
        return
    if args.csv:
        print(",".join(["engine"] + TIMING_HEADERS))
        for r in results:
            for row in r.rows:
                print(",".join([r.engine] + [str(c) for c in row.cells()]))
        return
    for r in results:
        print(f"\n{r.engine} — task {r.task}" + (f" ({r.note})" if r.note else ""))
        print(markdown_table(TIMING_HEADERS, [row.cells() for row in r.rows]))
    base = results[0] if results else None
    summary = []
    for r in results:
        ratio_tg = median(r.tg128) and median(base.tg128) / median(r.tg128) if r is not base else 1.0
        ratio_pp = median(r.pp512) and median(base.pp512) / median(r.pp512) if r is not base else 1.0
        summary.append([r.engine, mean_sd(r.pp512), mean_sd(r.tg128), round(ratio_pp, 2), round(ratio_tg, 2),
                        round(r.load_s, 3), round(r.compile_s, 1), round(r.peak_rss_mb, 1)])
    print(f"\nSummary — {meta['cpu_path']}, {threads} threads, torch {meta['torch']}")
    print("Paths: " + "; ".join(f"{k}: {v}" for k, v in meta["paths"].items()))
    print(markdown_table(["engine", "pp512 (t/s)", "tg128 (t/s)", "edgellm/engine pp", "edgellm/engine tg",
                          "load (s)", "compile (s)", "peak RSS (MB)"], summary))
    if breakdown:
        print("\nProfile (eager, per-module wall time)")
        print(markdown_table(["part", "ms", "share"], breakdown))


def plot(results: list[BenchResult], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: --plot needs matplotlib (pip install 'edgellm[plot]')", file=sys.stderr)
        return
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for r in results:
        xs = [row.prompt_tokens for row in r.rows]
        a1.plot(xs, [row.tokens_per_s for row in r.rows], marker="o", label=r.engine)
        a2.plot(xs, [row.prefill_ms for row in r.rows], marker="o", label=r.engine)
    a1.set(xlabel="prompt length (tokens)", ylabel="decode tokens/s", title="Decode speed")
    a2.set(xlabel="prompt length (tokens)", ylabel="prefill (ms)", title="Prefill time")
    for a in (a1, a2):
        a.grid(alpha=0.3)
        a.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
