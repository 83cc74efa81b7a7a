"""`edgellm bench`: the seeds' timing tables (decode / benchmark / benchmark_exact / profile), a llama-bench
style summary (pp512, tg128), load time, peak RSS, and peers (llama.cpp, transformers) run back to back."""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

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


@dataclass
class Row:
    example: int
    prompt_tokens: int
    new_tokens: int
    total_s: float
    prefill_ms: float
    time_per_token_ms: float
    tokens_per_s: float

    def cells(self) -> list:
        return [self.example, self.prompt_tokens, self.new_tokens, round(self.total_s, 5), round(self.prefill_ms, 3),
                round(self.time_per_token_ms, 3), round(self.tokens_per_s, 5)]


@dataclass
class BenchResult:
    engine: str
    task: str
    rows: list[Row] = field(default_factory=list)
    pp512: list[float] = field(default_factory=list)  # prefill tokens/s of a 512-token prompt, per repeat
    tg128: list[float] = field(default_factory=list)  # decode tokens/s over 128 new tokens, per repeat
    load_s: float = 0.0
    compile_s: float = 0.0
    peak_rss_mb: float = 0.0
    note: str = ""


def peak_rss_mb() -> float:
    """Peak resident memory of this process (VmHWM; ru_maxrss would include a parent's peak across exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


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


def prompt_of_length(ids: list[int], n: int, offset: int = 0) -> list[int]:
    if len(ids) < offset + n:
        raise ValueError(f"benchmark text has only {len(ids)} tokens; need {offset + n}")
    return ids[offset:offset + n]


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def mean_sd(xs: list[float]) -> str:
    if not xs:
        return "n/a"
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.mean(xs):.2f} ± {sd:.2f}"


# ------------------------------------------------------------------------------------------------ engines
class Engine:
    """One way to run a model: prefill a prompt, then decode `new` tokens greedily. Returns timings."""

    name = "edgellm"
    note = ""
    load_s = 0.0
    compile_s = 0.0

    def run(self, prompt_ids: list[int], new: int) -> Row:  # pragma: no cover - interface
        raise NotImplementedError


class EdgeEngine(Engine):
    def __init__(self, llm, compile: bool) -> None:
        from .generate import SamplingParams

        self.llm = llm
        self.params = SamplingParams
        self.compile = compile
        self.name = f"edgellm ({'compiled' if compile else 'eager'})"

    def run(self, prompt_ids: list[int], new: int) -> Row:
        gen = self.llm.generator
        t0 = time.perf_counter()
        n = sum(1 for _ in gen.token_stream(prompt_ids, self.params(max_new_tokens=new, ignore_eos=True)))
        s = gen.stats
        self.compile_s = getattr(gen, "compile_s", 0.0)
        self.note = getattr(gen, "note", "")
        return Row(0, len(prompt_ids), n, time.perf_counter() - t0, s.prefill_ms, s.time_per_token_ms,
                   s.tokens_per_s)


class LlamaCppEngine(Engine):
    """llama-cpp-python on the same GGUF file, same threads, same prompt ids, greedy over raw logits."""

    def __init__(self, gguf_path: Path, threads: int, n_ctx: int, extra_bufts: bool = False) -> None:
        import llama_cpp
        from llama_cpp import llama_cpp as capi

        t0 = time.perf_counter()
        # The CPU "extra buffer types" (AMX / weight repacking) crash on quantized GGUFs on some CPUs, and the
        # Llama() constructor has no flag for them: patch the default model params it starts from.
        default_params = capi.llama_model_default_params

        def params_without_extra_bufts():
            params = default_params()
            if hasattr(params, "use_extra_bufts"):
                params.use_extra_bufts = extra_bufts
            return params

        capi.llama_model_default_params = params_without_extra_bufts
        try:
            self.llm = llama_cpp.Llama(model_path=str(gguf_path), n_threads=threads, n_threads_batch=threads,
                                       n_ctx=n_ctx, n_batch=512, n_ubatch=512, verbose=False)
        finally:
            capi.llama_model_default_params = default_params
        self.note = f"llama-cpp-python {llama_cpp.__version__}, use_extra_bufts={extra_bufts}"
        self.load_s = time.perf_counter() - t0
        self.name = "llama.cpp"
        self.n_vocab = self.llm.n_vocab()

    def _argmax(self) -> int:
        import numpy as np

        logits = np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.n_vocab,))
        return int(logits.argmax())

    def run(self, prompt_ids: list[int], new: int) -> Row:
        llm = self.llm
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt_ids)
        token = self._argmax()
        t1 = time.perf_counter()
        for _ in range(new - 1):
            llm.eval([token])
            token = self._argmax()
        t2 = time.perf_counter()
        per = (t2 - t1) * 1e3 / max(new - 1, 1)
        return Row(0, len(prompt_ids), new, t2 - t0, (t1 - t0) * 1e3, per, 1e3 / per)


class TransformersEngine(Engine):
    def __init__(self, source: Path, dtype: torch.dtype) -> None:
        import transformers

        t0 = time.perf_counter()
        if source.is_file():
            self.model = transformers.AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name,
                                                                           dtype=dtype)
        else:
            self.model = transformers.AutoModelForCausalLM.from_pretrained(str(source), dtype=dtype)
        self.model.eval()
        self.load_s = time.perf_counter() - t0
        self.name = "transformers"

    @torch.inference_mode()
    def run(self, prompt_ids: list[int], new: int) -> Row:
        from transformers import DynamicCache

        cache = DynamicCache()
        t0 = time.perf_counter()
        out = self.model(torch.tensor([prompt_ids]), past_key_values=cache, use_cache=True)
        token = out.logits[0, -1].argmax().view(1, 1)
        t1 = time.perf_counter()
        for _ in range(new - 1):
            out = self.model(token, past_key_values=out.past_key_values, use_cache=True)
            token = out.logits[0, -1].argmax().view(1, 1)
        t2 = time.perf_counter()
        per = (t2 - t1) * 1e3 / max(new - 1, 1)
        return Row(0, len(prompt_ids), new, t2 - t0, (t1 - t0) * 1e3, per, 1e3 / per)


# ------------------------------------------------------------------------------------------------ tasks
def task_prompts(task: str, tokenizer, lengths: list[int] | None, data: str | None) -> list[list[int]]:
    if task == "decode":
        return [tokenizer.encode_chat([{"role": "user", "content": p}]) for p in DECODE_PROMPTS]
    if lengths is None:
        lengths = {"benchmark": BENCHMARK_LENGTHS, "benchmark_exact": EXACT_LENGTHS, "profile": [256]}[task]
    ids = tokenizer.encode(benchmark_text(data))
    return [prompt_of_length(ids, n, offset=1000 * i) for i, n in enumerate(lengths)]


def run_rows(engine: Engine, prompts: list[list[int]], new: int, repeat: int,
             progress: Callable[[str], None]) -> list[Row]:
    rows = []
    engine.run(prompts[0][:8], 4)  # warm-up (first-call allocations, compile)
    for i, ids in enumerate(prompts, 1):
        runs = []
        for _ in range(repeat):
            runs.append(engine.run(ids, new))
        med = Row(i, len(ids), runs[0].new_tokens, median([r.total_s for r in runs]),
                  median([r.prefill_ms for r in runs]), median([r.time_per_token_ms for r in runs]),
                  median([r.tokens_per_s for r in runs]))
        rows.append(med)
        progress(f"[{engine.name}] example {i}/{len(prompts)}: {len(ids)} tokens, "
                 f"{med.tokens_per_s:.1f} tok/s, prefill {med.prefill_ms:.0f} ms")
    return rows


def llama_bench_summary(engine: Engine, tokenizer, repeat: int, data: str | None,
                        max_context: int) -> tuple[list[float], list[float]]:
    """llama-bench's pp512 (prefill a 512-token prompt) and tg128 (128 decoded tokens), at least 3 repeats.
    Models with a shorter context use the longest prompt that fits."""
    ids = tokenizer.encode(benchmark_text(data))
    n_pp = min(512, max_context - 8)
    prompt = prompt_of_length(ids, n_pp, offset=5000)
    pp, tg = [], []
    for _ in range(max(repeat, 3)):
        r = engine.run(prompt, 1)
        pp.append(n_pp / (r.prefill_ms / 1e3))
        r = engine.run(prompt[:16], min(129, max_context - 24))
        tg.append(r.tokens_per_s)
    return pp, tg


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
    from .cli import add_compile_args, add_model_args

    p = sub.add_parser("bench", help="prefill/decode timing tables, llama-bench summary, peers")
    add_model_args(p)
    add_compile_args(p)
    p.add_argument("--task", default="decode", choices=["decode", "benchmark", "benchmark_exact", "profile"])
    p.add_argument("--quant", default=None,
                   help="quantize weights before timing, e.g. rtn:w4:g32 (int4 kernels), rtn:w8:g-1 (int8), "
                        "awq:w4:g128; default: the checkpoint's weights in --dtype")
    p.add_argument("--prompt-len", type=int, nargs="+", default=None, help="override the task's prompt lengths")
    p.add_argument("--new-tokens", type=int, default=60)
    p.add_argument("--threads", type=int, default=None, help="default: physical cores")
    p.add_argument("--repeat", type=int, default=1, help="runs per example (medians are reported)")
    p.add_argument("--peer", action="append", default=[], choices=["llamacpp", "transformers"])
    p.add_argument("--data", default=None, help="text file for prompts (default: WikiText-2 test if present)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--csv", action="store_true")
    p.add_argument("--plot", default=None, help="PNG: tokens/s and prefill ms against prompt length")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    from .api import load

    threads = args.threads or physical_cores()
    torch.set_num_threads(threads)
    log = (lambda s: print(s, file=sys.stderr)) if not args.json else (lambda s: None)
    t0 = time.perf_counter()
    llm = load(args.model, dtype=args.dtype, rope_type=args.rope_type, compile=args.compile)
    load_s = time.perf_counter() - t0
    if args.quant:
        from .quant import quantize_llm

        quantize_llm(llm, args.quant)
        load_s = time.perf_counter() - t0  # load time includes quantizing and packing
    prompts = task_prompts(args.task, llm.tokenizer, args.prompt_len, args.data)
    if args.task == "profile":
        prompts = prompts[:1]
    results: list[BenchResult] = []
    engines: list[tuple[str, Callable[[], Engine]]] = [("edgellm", lambda: EdgeEngine(llm, args.compile))]
    n_ctx = max(len(p) for p in prompts) + args.new_tokens + 8
    for peer in args.peer:
        if peer == "llamacpp":
            if llm.loaded.format != "gguf":
                log("note: --peer llamacpp needs a GGUF model; skipped")
                continue
            engines.append(("llamacpp", lambda: LlamaCppEngine(llm.loaded.path, threads, max(n_ctx, 640))))
        else:
            engines.append(("transformers", lambda: TransformersEngine(llm.loaded.path, llm.dtype)))
    for key, make in engines:
        try:
            engine = make()
        except ImportError as e:
            log(f"note: peer {key} skipped ({e.name or e} not installed; `make bench-peers` installs llama-cpp-python)")
            continue
        res = BenchResult(engine.name, args.task, load_s=load_s if key == "edgellm" else engine.load_s)
        res.rows = run_rows(engine, prompts, args.new_tokens, args.repeat, log)
        res.pp512, res.tg128 = llama_bench_summary(engine, llm.tokenizer, args.repeat, args.data,
                                                   llm.config.max_seq_len)
        res.compile_s, res.note, res.peak_rss_mb = engine.compile_s, engine.note, peak_rss_mb()
        results.append(res)
    breakdown = profile_breakdown(llm, prompts[0], args.new_tokens) if args.task == "profile" else None
    print_results(args, results, threads, breakdown)
    if args.plot:
        plot(results, args.plot)
    return 0


def print_results(args: argparse.Namespace, results: list[BenchResult], threads: int,
                  breakdown: list[list] | None) -> None:
    meta = {"cpu": cpu_model(), "threads": threads, "torch": torch.__version__, "task": args.task}
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
    print(f"\nSummary — {meta['cpu']}, {threads} threads, torch {meta['torch']}")
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
