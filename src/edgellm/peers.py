"""The engines `edgellm bench` times: the interface, the peers (llama.cpp via llama-cpp-python, HF
transformers) and the timing loops shared with edgellm's own engine.

This file imports nothing from edgellm (and not torch at module level) so that `edgellm bench` can run it as a
plain script in a child process per peer: each peer's peak RSS is then its own, not edgellm's plus torch's.
    python peers.py JOB.json   ->  serves one peer's Session over stdin/stdout (see `serve`)
"""

from __future__ import annotations

import json
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path


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


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


class Engine:
    """One way to run a model: prefill a prompt, then decode `new` tokens greedily. Returns timings."""

    name = "edgellm"
    note = ""
    load_s = 0.0
    compile_s = 0.0

    def run(self, prompt_ids: list[int], new: int) -> Row:  # pragma: no cover - interface
        raise NotImplementedError


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
    def __init__(self, source: Path, dtype) -> None:
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

    def run(self, prompt_ids: list[int], new: int) -> Row:
        import torch

        with torch.inference_mode():
            return self._run(torch, prompt_ids, new)

    def _run(self, torch, prompt_ids: list[int], new: int) -> Row:
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



# ------------------------------------------------------------------------------------------------ timing
class Session:
    """Times one engine one step at a time, so `edgellm bench` can interleave engines: example i of every
    engine, then example i + 1, ...; then pp512/tg128 rounds in turn. On a machine whose speed drifts, drift
    then hits every engine alike instead of whichever ran last. Runs in-process for edgellm and inside each
    peer's child process (`serve`)."""

    def __init__(self, engine: Engine, job: dict) -> None:
        self.engine, self.job = engine, job
        self.name = engine.name
        self.result = BenchResult(engine.name, job["task"], load_s=engine.load_s)

    def warmup(self) -> None:
        self.engine.run(self.job["prompts"][0][:8], 4)  # first-call allocations, compile

    def row(self, index: int) -> Row:
        """Example `index` of the task, `repeat` times; the medians become its table row."""
        ids, new = self.job["prompts"][index], self.job["new_tokens"]
        runs = [self.engine.run(ids, new) for _ in range(self.job["repeat"])]
        row = Row(index + 1, len(ids), runs[0].new_tokens, median([r.total_s for r in runs]),
                  median([r.prefill_ms for r in runs]), median([r.time_per_token_ms for r in runs]),
                  median([r.tokens_per_s for r in runs]))
        self.result.rows.append(row)
        return row

    def summary_round(self) -> tuple[float, float]:
        """One llama-bench round: pp512 (prefill a 512-token prompt) and tg128 (128 decoded tokens), in t/s."""
        job = self.job
        r = self.engine.run(job["pp_prompt"], 1)
        pp = len(job["pp_prompt"]) / (r.prefill_ms / 1e3)
        tg = self.engine.run(job["tg_prompt"], min(129, job["max_context"] - 24)).tokens_per_s
        self.result.pp512.append(pp)
        self.result.tg128.append(tg)
        return pp, tg

    def finish(self) -> BenchResult:
        res = self.result
        res.compile_s, res.note, res.peak_rss_mb = self.engine.compile_s, self.engine.note, peak_rss_mb()
        return res


def summary_rounds(job: dict) -> int:
    return max(job["repeat"], 3)  # llama-bench style mean ± sd needs a few rounds


def make_peer(peer: str, job: dict) -> Engine:
    if peer == "llamacpp":
        return LlamaCppEngine(Path(job["model_path"]), job["threads"], max(job["n_ctx"], 640))
    import torch

    torch.set_num_threads(job["threads"])
    return TransformersEngine(Path(job["model_path"]), getattr(torch, job["dtype"]))


def _reply(obj: dict) -> None:
    print(json.dumps(obj), flush=True)


def serve(job_path: str) -> int:
    """A peer's Session in this (child) process, driven by the parent one JSON line at a time on stdin
    ({"op": "warmup" | "row" (with "index") | "summary" | "finish"}); one JSON line answers each. The first
    line out is {"ready": name} or {"skipped": reason}."""
    job = json.loads(Path(job_path).read_text())
    try:
        engine = make_peer(job["peer"], job)
    except ImportError as e:
        _reply({"skipped": f"{e.name or e} not installed"})
        return 0
    session = Session(engine, job)
    _reply({"ready": engine.name})
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "warmup":
            session.warmup()
            _reply({})
        elif cmd["op"] == "row":
            _reply(asdict(session.row(cmd["index"])))
        elif cmd["op"] == "summary":
            pp, tg = session.summary_round()
            _reply({"pp": pp, "tg": tg})
        elif cmd["op"] == "finish":
            _reply(asdict(session.finish()))
            return 0
        else:
            raise SystemExit(f"unknown request {cmd!r}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python peers.py JOB.json (internal; use `edgellm bench --peer ...`)")
    raise SystemExit(serve(sys.argv[1]))
