"""`edgellm bench --task serve`: `edgellm serve` under concurrent streaming load, against llama-cpp-python's
OpenAI-compatible server on the same GGUF, in the same run (issue: "aggregate generated tokens/s and p50/p95
time-to-first-token at 1, 4, 8 and 16 concurrent streams ... at 8 streams >= 3x our own single-stream tokens/s
and >= 2x the peer's aggregate").

Each server runs as a real subprocess on a free 127.0.0.1 port, one at a time (ours, then the peer: two servers
at once would share the cores), and is always terminated (killed if it does not exit). For every stream count
S, S client threads each send `--requests-per-stream` streaming `POST /v1/completions` requests one after the
other (greedy, no ignore_eos: prompts are ~100-token WikiText-2 valid excerpts cut mid-sentence, so answers
mostly run to max_tokens; the actual token totals and finish reasons are reported). Per request: time to first
token (first chunk with text), completion tokens (the usage chunk when the server sends one; else max_tokens
for finish_reason "length"; else the number of text chunks), end time. Aggregate tokens/s of a round = its
completion tokens / its wall time. Stream counts are interleaved within each of `--repeat` rounds; reported
are the median aggregate tokens/s and p50/p95 TTFT over all requests of all rounds, per engine and S, with
the ratios ours@S / ours@1 and ours / peer at the same S. A failed request is counted and reported, never
fatal; a server that does not start is reported (stderr tail + one line) and the other engine still runs.

Arguments read from the `bench` parser (`args`):
    --model                 GGUF (or HF folder / hub id; the peer needs a GGUF); default: the bundled SmolLM2
    --streams 1 4 8 16      concurrent streams per round            } added by `add_args` (bench.py does not
    --requests-per-stream   sequential requests per stream (2)      } have them)
    --parallel              our server's --parallel (default: max --streams)
    --new-tokens            max_tokens per request (bench's default applies; the issue's setting is 64)
    --repeat                rounds per engine; medians are reported (the issue's setting is 3)
    --peer llamacpp         also run `python -m llama_cpp.server` (import it from PYTHONPATH or the venv)
    --threads               both servers' threads (default: physical cores)
    --speculative lookup    our server drafts by prompt lookup (serve --speculative lookup)
    --json                  one JSON object on stdout instead of tables

The issue's settings: edgellm bench --task serve --peer llamacpp --streams 1 4 8 16 --new-tokens 64 --repeat 3
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import IO, Any

from .kernels import cpu
from .report import markdown_table

DEFAULT_STREAMS = [1, 4, 8, 16]
DEFAULT_REQUESTS_PER_STREAM = 2
PROMPT_WORDS = 82             # ~100 tokens of WikiText with SmolLM2's tokenizer (median 100, max ~140)
PROMPT_TOKENS_BOUND = 160     # what the servers' context must hold for a prompt
START_TIMEOUT_S = 300.0       # load (+ compile) until /health answers 200
READ_TIMEOUT_S = 300.0        # longest silence on a request's socket (a queued request waits for the others)
STOP_TIMEOUT_S = 15.0         # SIGTERM, then SIGKILL of the server's process group
GOAL_STREAMS, GOAL_VS_SELF, GOAL_VS_PEER = 8, 3.0, 2.0
OURS, PEER = "edgellm serve", "llama-cpp-python server"

Log = Callable[[str], None]


# ------------------------------------------------------------------------------------------------ CLI
def add_args(parser: argparse.ArgumentParser) -> None:
    """The arguments `--task serve` needs that `edgellm bench` does not already have."""
    parser.add_argument("--streams", type=int, nargs="+", default=None,
                        help="serve task: concurrent streams per round (default: 1 4 8 16)")
    parser.add_argument("--requests-per-stream", type=int, default=DEFAULT_REQUESTS_PER_STREAM,
                        help="serve task: sequential streaming requests per stream (default: 2)")
    parser.add_argument("--parallel", type=int, default=None,
                        help="serve task: our server's --parallel (default: the largest --streams)")


# ------------------------------------------------------------------------------------------------ prompts
_WIKI_FIXES = [(" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."), (" , ", ", "), (" . ", ". "), (" ; ", "; "),
               (" : ", ": "), (" 's", "'s"), ("( ", "("), (" )", ")"), (' " ', ' "')]


def _wikitext_paragraphs() -> list[str]:
    from .eval.data import find_data_dir

    try:
        root = find_data_dir(need="wikitext-2-raw/wiki.valid.raw")
    except Exception:  # an unusable $EDGELLM_DATA_DIR: fall back to synthetic text
        return []
    if root is None:
        return []
    lines = (root / "wikitext-2-raw" / "wiki.valid.raw").read_text(encoding="utf-8").splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("=")]


def _cut(words: list[str]) -> str:
    """The words as a prompt that stops mid-sentence, so a continuation has no reason to end early."""
    while len(words) > 1 and words[-1][-1:] in ".!?\"'":
        words = words[:-1]
    text = " ".join(words)
    for a, b in _WIKI_FIXES:
        text = text.replace(a, b)
    return text


def prompt_bank(n: int) -> tuple[list[str], str]:
    """`n` different prompts of ~PROMPT_WORDS words (WikiText-2 valid when present, else synthetic) and where
    they came from."""
    prompts: list[str] = []
    for para in _wikitext_paragraphs():
        words = para.split()
        for i in range(0, len(words) - PROMPT_WORDS + 1, PROMPT_WORDS):
            prompts.append(_cut(words[i:i + PROMPT_WORDS]))
            if len(prompts) == n:
                return prompts, f"WikiText-2 valid, {PROMPT_WORDS} words each"
    if prompts:  # a short file: reuse its excerpts
        return [prompts[i % len(prompts)] for i in range(n)], f"WikiText-2 valid (reused), {PROMPT_WORDS} words"
    vocab = ("the river city council north early history model system music record team season village war "
             "later became known large small local public first second during after before between under "
             "which their several including however although while report station church school road").split()
    out = []
    for i in range(n):
        rng = random.Random(i)
        out.append(_cut([f"In {1800 + i % 200}", "the"] + [rng.choice(vocab) for _ in range(PROMPT_WORDS - 3)]))
    return out, f"synthetic ({PROMPT_WORDS} words each; WikiText-2 valid not found)"


# ------------------------------------------------------------------------------------------------ servers
class ServerFailed(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(port: int, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


class Server:
    """A server subprocess in its own process group; its stdout+stderr go to a temporary file."""

    def __init__(self, name: str, cmd: list[str], port: int, env: dict[str, str] | None = None) -> None:
        self.name, self.cmd, self.port = name, cmd, port
        self.output: IO[bytes] = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self.output, stderr=subprocess.STDOUT,
                                     env=env, start_new_session=True)
        self.model_id = "default"

    def tail(self, lines: int = 20) -> str:
        self.output.flush()
        self.output.seek(0)
        text = self.output.read().decode("utf-8", "replace")
        return "\n".join(text.rstrip().splitlines()[-lines:])

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> float:
        """Seconds until GET /health (or, for a server without it, GET /v1/models) answered 200."""
        t0 = time.perf_counter()
        while True:
            if self.proc.poll() is not None:
                raise ServerFailed(f"{self.name} exited with status {self.proc.returncode} before it was ready")
            if time.perf_counter() - t0 > timeout:
                raise ServerFailed(f"{self.name} not ready after {timeout:.0f} s")
            try:
                status, _ = _get(self.port, "/health")
                if status == 404:  # llama-cpp-python's server has no /health
                    status, _ = _get(self.port, "/v1/models")
                if status == 200:
                    break
            except (OSError, http.client.HTTPException):
                pass
            time.sleep(0.25)
        ready_s = time.perf_counter() - t0
        try:
            status, body = _get(self.port, "/v1/models")
            if status == 200:
                self.model_id = str(json.loads(body)["data"][0]["id"])
        except (OSError, http.client.HTTPException, ValueError, LookupError, TypeError):
            pass
        return ready_s

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)  # the group of the server we started
                except ProcessLookupError:
                    pass
                self.proc.wait(timeout=STOP_TIMEOUT_S)
        self.output.close()


def ours_command(model: str, port: int, parallel: int, ctx: int, threads: int,
                 speculative: str | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "edgellm.cli", "serve", "--model", model, "--host", "127.0.0.1",
           "--port", str(port), "--parallel", str(parallel), "--ctx-size", str(ctx), "--threads", str(threads)]
    return cmd + (["--speculative", speculative] if speculative else [])


def peer_command(gguf: str, port: int, ctx: int, threads: int) -> list[str]:
    # interrupt_requests (on by default) ends a stream with [DONE] as soon as another request waits: with it,
    # concurrent streams get ~1 token each. Off, requests queue on the server's one lock and run one at a time.
    # logits_all (on by default, for prompt logprobs) computes the LM head for every prompt token: off, the
    # peer's prefill is ~8% faster here and does the same work as ours.
    return [sys.executable, "-m", "llama_cpp.server", "--model", gguf, "--host", "127.0.0.1", "--port", str(port),
            "--n_threads", str(threads), "--n_threads_batch", str(threads), "--n_ctx", str(ctx),
            "--interrupt_requests", "false", "--logits_all", "false", "--verbose", "false"]


def peer_build() -> dict[str, str] | str:
    """The llama-cpp-python this interpreter (with its PYTHONPATH) imports: version, location, llama.cpp's
    CPU feature line; or why it cannot be used."""
    code = ("import json, os, llama_cpp, llama_cpp.server.app\n"
            "print(json.dumps({'version': llama_cpp.__version__, 'path': os.path.dirname(llama_cpp.__file__),"
            " 'system_info': llama_cpp.llama_print_system_info().decode().strip()}))")
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError) as e:
        return str(e)
    if out.returncode != 0:
        return (out.stderr.strip().splitlines() or [f"exit status {out.returncode}"])[-1]
    try:
        return dict(json.loads(out.stdout.strip().splitlines()[-1]))
    except (ValueError, IndexError):
        return f"unexpected output: {out.stdout[-200:]!r}"


# ------------------------------------------------------------------------------------------------ load
@dataclass
class RequestResult:
    ok: bool = False
    tokens: int = 0
    ttft_s: float = math.nan
    start_s: float = 0.0
    end_s: float = 0.0
    first_s: float = math.nan
    prompt_tokens: int | None = None
    finish_reason: str = ""
    token_source: str = ""   # usage | length | chunks
    error: str = ""

    @property
    def stream_tps(self) -> float:
        """Decode rate this client saw after its first token."""
        span = self.end_s - self.first_s
        return (self.tokens - 1) / span if self.ok and self.tokens > 1 and span > 0 else math.nan


def stream_completion(port: int, model: str, prompt: str, max_tokens: int,
                      timeout: float = READ_TIMEOUT_S) -> RequestResult:
    r = RequestResult()
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                       "stream": True, "stream_options": {"include_usage": True}}).encode()
    headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
    if os.environ.get("EDGELLM_API_KEY"):  # our server, started with this environment, then requires it
        headers["Authorization"] = f"Bearer {os.environ['EDGELLM_API_KEY']}"
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    chunks, usage_tokens, done = 0, None, False
    r.start_s = time.perf_counter()
    try:
        conn.request("POST", "/v1/completions", body=body, headers=headers)
        resp = conn.getresponse()
        if resp.status != 200:
            r.error = f"HTTP {resp.status}: {resp.read(300).decode('utf-8', 'replace').strip()}"
            return r
        for raw in resp:
            line = raw.decode("utf-8", "replace").strip()
            if not line.startswith("data:"):
                continue  # blank separators, ": ping" comments, "event:" lines
            data = line[5:].strip()
            if data == "[DONE]":
                done = True
                break
            obj = json.loads(data)
            if not isinstance(obj, dict):
                continue
            if obj.get("error"):
                r.error = f"server error: {json.dumps(obj['error'])[:200]}"
                return r
            for choice in obj.get("choices") or []:
                if choice.get("text"):
                    chunks += 1
                    if chunks == 1:
                        r.first_s = time.perf_counter()
                if choice.get("finish_reason"):
                    r.finish_reason = str(choice["finish_reason"])
            usage = obj.get("usage")
            if isinstance(usage, dict) and usage.get("completion_tokens") is not None:
                usage_tokens = int(usage["completion_tokens"])
                if usage.get("prompt_tokens") is not None:
                    r.prompt_tokens = int(usage["prompt_tokens"])
        r.end_s = time.perf_counter()
        if not done:
            r.error = f"stream ended without data: [DONE] after {chunks} chunks"
            return r
    except (OSError, http.client.HTTPException, ValueError, TypeError) as e:
        r.end_s = time.perf_counter()
        r.error = f"{type(e).__name__}: {e}"
        return r
    finally:
        conn.close()
    if usage_tokens is not None:
        r.tokens, r.token_source = usage_tokens, "usage"
    elif r.finish_reason == "length":
        r.tokens, r.token_source = max_tokens, "length"
    else:
        r.tokens, r.token_source = chunks, "chunks"
    r.ttft_s = r.first_s - r.start_s
    r.ok = True
    return r


@dataclass
class Round:
    streams: int
    wall_s: float
    requests: list[RequestResult]

    @property
    def tokens(self) -> int:
        return sum(r.tokens for r in self.requests if r.ok)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s > 0 else math.nan


def run_round(port: int, model: str, prompts: list[list[str]], max_tokens: int) -> Round:
    """len(prompts) concurrent clients, client i sending prompts[i] one request after another."""
    results: list[list[RequestResult]] = [[] for _ in prompts]
    go = threading.Event()

    def client(i: int) -> None:
        go.wait()
        for p in prompts[i]:
            try:
                results[i].append(stream_completion(port, model, p, max_tokens))
            except Exception as e:  # never let one client take the round down
                results[i].append(RequestResult(error=f"{type(e).__name__}: {e}", end_s=time.perf_counter()))

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(len(prompts))]
    for t in threads:
        t.start()
    t0 = time.perf_counter()
    go.set()
    deadline = t0 + (READ_TIMEOUT_S + 30) * max(len(p) for p in prompts)
    for t in threads:
        t.join(timeout=max(deadline - time.perf_counter(), 0.1))
    end = time.perf_counter()
    flat = []
    for i, rs in enumerate(results):
        rs = list(rs)
        rs += [RequestResult(error="client thread still running at the round's deadline", end_s=end)
               for _ in range(len(prompts[i]) - len(rs))]
        flat += rs
    ends = [r.end_s for r in flat if r.end_s]
    return Round(len(prompts), (max(ends) if ends else end) - t0, flat)


# ------------------------------------------------------------------------------------------------ results
def percentile(xs: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default); nan for no data."""
    xs = sorted(x for x in xs if not math.isnan(x))
    if not xs:
        return math.nan
    k = (len(xs) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def _median(xs: list[float]) -> float:
    xs = [x for x in xs if not math.isnan(x)]
    return statistics.median(xs) if xs else math.nan


@dataclass
class StreamSummary:
    engine: str
    streams: int
    tokens_per_s: float                 # median over rounds of the aggregate rate
    rounds_tokens_per_s: list[float]
    ttft_p50_ms: float                  # over every successful request of every round
    ttft_p95_ms: float
    stream_tokens_per_s: float          # median per-request decode rate after the first token
    tokens_per_round: list[int]
    requests: int
    failed: int
    finish_reasons: dict[str, int]
    token_sources: dict[str, int]
    prompt_tokens: float                # median, when the server reports usage
    vs_single: float = math.nan         # ours@S / ours@1 (or the same engine's smallest S)
    vs_peer: float = math.nan           # ours / peer at the same S (our rows only)
    errors: list[str] = field(default_factory=list)


def summarize(engine: str, rounds: list[Round]) -> StreamSummary:
    reqs = [r for rd in rounds for r in rd.requests]
    ok = [r for r in reqs if r.ok]
    prompt_tokens = [float(r.prompt_tokens) for r in ok if r.prompt_tokens is not None]
    return StreamSummary(
        engine=engine, streams=rounds[0].streams,
        tokens_per_s=_median([rd.tokens_per_s for rd in rounds]),
        rounds_tokens_per_s=[round(rd.tokens_per_s, 2) for rd in rounds],
        ttft_p50_ms=percentile([r.ttft_s * 1e3 for r in ok], 0.50),
        ttft_p95_ms=percentile([r.ttft_s * 1e3 for r in ok], 0.95),
        stream_tokens_per_s=_median([r.stream_tps for r in ok]),
        tokens_per_round=[rd.tokens for rd in rounds], requests=len(reqs), failed=len(reqs) - len(ok),
        finish_reasons=dict(Counter(r.finish_reason or "none" for r in ok)),
        token_sources=dict(Counter(r.token_source for r in ok)),
        prompt_tokens=_median(prompt_tokens),
        errors=sorted({r.error for r in reqs if not r.ok})[:5])


@dataclass
class EngineRun:
    name: str
    command: list[str]
    ready_s: float = math.nan
    error: str = ""
    summaries: list[StreamSummary] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def bench_server(name: str, cmd: list[str], port: int, plan: dict[int, list[list[list[str]]]], repeat: int,
                 streams: list[int], new_tokens: int, warmup_prompts: list[str], log: Log,
                 env: dict[str, str] | None = None) -> EngineRun:
    """Start one server, warm it up, run every stream count `repeat` times (interleaved), stop it."""
    run = EngineRun(name, cmd)
    log(f"[{name}] starting: {' '.join(cmd)}")
    try:
        server = Server(name, cmd, port, env)
    except OSError as e:
        run.error = f"{name} could not be started: {e}"
        print(f"error: {run.error}", file=sys.stderr)
        return run
    try:
        try:
            run.ready_s = server.wait_ready()
        except ServerFailed as e:
            run.error = str(e)
            print(f"--- {name} output (last lines) ---\n{server.tail()}\n---", file=sys.stderr)
            print(f"error: {run.error}", file=sys.stderr)
            return run
        log(f"[{name}] ready in {run.ready_s:.1f} s on port {port} (model id {server.model_id!r})")
        # warm-up, untimed: one full request, then a short round at each stream count (first-use compiles and
        # allocations for each batch size happen here, not in the timed rounds)
        warm = [stream_completion(port, server.model_id, warmup_prompts[0], new_tokens)]
        for s in streams:
            warm += run_round(port, server.model_id, [[p] for p in warmup_prompts[1:s + 1]],
                              min(8, new_tokens)).requests
        bad = [r.error for r in warm if not r.ok]
        if bad:
            run.notes.append(f"warm-up: {len(bad)}/{len(warm)} requests failed ({bad[0]})")
            log(f"[{name}] note: {run.notes[-1]}")
        rounds: dict[int, list[Round]] = {s: [] for s in streams}
        for k in range(repeat):
            for s in streams:
                rd = run_round(port, server.model_id, plan[s][k], new_tokens)
                rounds[s].append(rd)
                failed = sum(not r.ok for r in rd.requests)
                ttft = percentile([r.ttft_s * 1e3 for r in rd.requests if r.ok], 0.5)
                log(f"[{name}] round {k + 1}/{repeat}, {s} streams: {rd.tokens} tokens in {rd.wall_s:.2f} s = "
                    f"{rd.tokens_per_s:.1f} t/s, TTFT p50 {ttft:.0f} ms" + (f", {failed} FAILED" if failed else ""))
                if server.proc.poll() is not None:
                    raise ServerFailed(f"{name} exited with status {server.proc.returncode} during the run")
        run.summaries = [summarize(name, rounds[s]) for s in streams]
    except ServerFailed as e:
        run.error = str(e)
        print(f"--- {name} output (last lines) ---\n{server.tail()}\n---", file=sys.stderr)
        print(f"error: {run.error}", file=sys.stderr)
    finally:
        server.close()
    return run


def add_ratios(runs: list[EngineRun]) -> None:
    peer = {s.streams: s for r in runs if r.name == PEER for s in r.summaries}
    for r in runs:
        if not r.summaries:
            continue
        base = min(r.summaries, key=lambda s: s.streams)
        for s in r.summaries:
            s.vs_single = s.tokens_per_s / base.tokens_per_s if base.tokens_per_s else math.nan
            if r.name == OURS and s.streams in peer and peer[s.streams].tokens_per_s:
                s.vs_peer = s.tokens_per_s / peer[s.streams].tokens_per_s


def goal(runs: list[EngineRun]) -> dict[str, Any] | None:
    ours = next((s for r in runs if r.name == OURS for s in r.summaries if s.streams == GOAL_STREAMS), None)
    if ours is None:
        return None
    base = min(next(r for r in runs if r.name == OURS).summaries, key=lambda s: s.streams)
    out: dict[str, Any] = {"streams": GOAL_STREAMS, "vs_single": ours.vs_single,
                           "vs_single_base_streams": base.streams, "vs_single_met": ours.vs_single >= GOAL_VS_SELF}
    if not math.isnan(ours.vs_peer):
        out |= {"vs_peer": ours.vs_peer, "vs_peer_met": ours.vs_peer >= GOAL_VS_PEER}
    return out


def _json_safe(obj: Any) -> Any:
    """NaN (no data) as null: json.dumps would write NaN, which is not JSON."""
    if isinstance(obj, float):
        return None if math.isnan(obj) or math.isinf(obj) else obj
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    return obj


def _r(x: float, nd: int = 1) -> float | None:
    return None if math.isnan(x) else round(x, nd)


def print_tables(meta: dict[str, Any], runs: list[EngineRun]) -> None:
    print(f"\nServing under concurrent streams — {meta['cpu_path']}, {meta['threads']} threads")
    print("Paths: " + "; ".join(f"{k}: {v}" for k, v in meta["paths"].items()))
    if meta.get("peer_build"):
        b = meta["peer_build"]
        print(f"Peer: llama-cpp-python {b['version']} ({b['path']}): {b['system_info']}")
    print(f"Model: {meta['model']}; prompts: {meta['prompts']}; max_tokens {meta['new_tokens']}, "
          f"{meta['requests_per_stream']} requests per stream, {meta['repeat']} rounds (medians)")
    rows = []
    for r in runs:
        for s in r.summaries:
            rows.append([r.name, s.streams, _r(s.tokens_per_s), " ".join(f"{x:.1f}" for x in s.rounds_tokens_per_s),
                         _r(s.ttft_p50_ms, 0), _r(s.ttft_p95_ms, 0), _r(s.stream_tokens_per_s),
                         " ".join(str(t) for t in s.tokens_per_round), f"{s.requests - s.failed}/{s.requests}",
                         _r(s.vs_single, 2), _r(s.vs_peer, 2) if r.name == OURS else None])
    if rows:
        print(markdown_table(["engine", "streams", "agg t/s (median)", "rounds t/s", "TTFT p50 (ms)",
                              "TTFT p95 (ms)", "per-stream t/s", "tokens per round", "ok requests",
                              "x own lowest S", "ours/peer"], rows))
    for r in runs:
        if r.error:
            print(f"{r.name}: FAILED — {r.error}")
        for n in r.notes:
            print(f"{r.name}: note — {n}")
        for s in r.summaries:
            extra = f"finish {s.finish_reasons}, tokens counted from {s.token_sources}"
            if not math.isnan(s.prompt_tokens):
                extra += f", prompt ~{s.prompt_tokens:.0f} tokens"
            print(f"{r.name} @ {s.streams}: {extra}" + (f"; errors: {s.errors}" if s.errors else ""))
    g = meta.get("goal")
    if g:
        line = (f"Goal at {g['streams']} streams: ours/ours@{g['vs_single_base_streams']} = {g['vs_single']:.2f} "
                f"(>= {GOAL_VS_SELF}: {'met' if g['vs_single_met'] else 'NOT met'})")
        if "vs_peer" in g:
            line += f", ours/peer = {g['vs_peer']:.2f} (>= {GOAL_VS_PEER}: {'met' if g['vs_peer_met'] else 'NOT met'})"
        print(line)


# ------------------------------------------------------------------------------------------------ entry
def run(args: argparse.Namespace) -> int:
    def arg(name: str, default: Any) -> Any:
        value = getattr(args, name, None)
        return default if value is None else value

    streams = sorted(set(arg("streams", None) or DEFAULT_STREAMS))
    rps, new_tokens, repeat = arg("requests_per_stream", DEFAULT_REQUESTS_PER_STREAM), arg("new_tokens", 64), \
        arg("repeat", 1)
    parallel = arg("parallel", max(streams))
    peers = list(getattr(args, "peer", None) or [])
    as_json = bool(getattr(args, "json", False))
    log: Log = (lambda s: None) if as_json else (lambda s: print(s, file=sys.stderr, flush=True))
    if min(streams) < 1 or min(rps, new_tokens, repeat, parallel) < 1:
        print("error: --streams, --requests-per-stream, --new-tokens, --repeat and --parallel must be >= 1",
              file=sys.stderr)
        return 2
    methods = list(getattr(args, "speculative", None) or [])
    if methods not in ([], ["lookup"]) or getattr(args, "draft_k", None):
        print("error: the serve task takes --speculative lookup (the server's own drafts; no --draft-k)",
              file=sys.stderr)
        return 2
    speculative = methods[0] if methods else None
    threads = getattr(args, "threads", None)
    if not threads:
        from .bench import physical_cores

        threads = physical_cores()
    from .loading import resolve

    model_path = resolve(getattr(args, "model", None))
    ctx = -(-(PROMPT_TOKENS_BOUND + new_tokens + 32) // 64) * 64

    # the same prompts, in the same order, for every engine; every request its own prompt (no prefix reuse)
    n_prompts = repeat * sum(streams) * rps
    bank, source = prompt_bank(n_prompts + max(streams) + 1)
    it = iter(bank)
    plan = {s: [[[next(it) for _ in range(rps)] for _ in range(s)] for _ in range(repeat)] for s in streams}
    warmup_prompts = list(it)

    meta: dict[str, Any] = {"task": "serve", "cpu": cpu.cpu_name(), "cpu_path": cpu.summary(),
                            "paths": cpu.paths(), "threads": threads, "model": str(model_path),
                            "prompts": source, "streams": streams, "requests_per_stream": rps,
                            "new_tokens": new_tokens, "repeat": repeat, "parallel": parallel, "ctx_size": ctx,
                            "speculative": speculative}
    runs: list[EngineRun] = []
    rc = 0
    port = free_port()
    runs.append(bench_server(OURS, ours_command(str(model_path), port, parallel, ctx, threads, speculative), port, plan,
                             repeat, streams, new_tokens, warmup_prompts, log))
    rc = 1 if runs[-1].error else 0
    for peer in peers:
        if peer != "llamacpp":
            log(f"note: peer {peer} has no server; skipped")
            continue
        if model_path.suffix.lower() != ".gguf" or not model_path.is_file():
            log("note: --peer llamacpp needs a GGUF model; skipped")
            continue
        build = peer_build()
        if isinstance(build, str):
            log(f"note: peer llamacpp skipped ({build}; `make bench-peers` installs llama-cpp-python[server], "
                "or put a build on PYTHONPATH)")
            continue
        meta["peer_build"] = build
        port = free_port()
        runs.append(bench_server(PEER, peer_command(str(model_path), port, ctx, threads), port, plan, repeat,
                                 streams, new_tokens, warmup_prompts, log))
    add_ratios(runs)
    meta["goal"] = goal(runs)
    if as_json:
        print(json.dumps(_json_safe({**meta, "engines": [asdict(r) for r in runs]}), indent=2))
    else:
        print_tables(meta, runs)
    return rc

