"""The serving engine without HTTP: plain decoding vs prompt-lookup speculation in the continuous batching, same run.

    python scripts/bench_serve_engine.py --streams 1 4 8 16 --new-tokens 64 --rounds 4 [--draft-k K]

`edgellm bench --task serve` times the real server with real clients, but on 2 cores its rounds drift ±10 %
between runs minutes apart, more than speculation changes at 8-16 streams. Here both engines (one plain, one with
`speculative="lookup"`) share the loaded model and take the same requests (the serve bench's WikiText-2 valid
prompts, greedy, `--new-tokens` each, S submitted at once), alternated within each round; each cell is the median
over rounds of generated tokens / wall time (prefill included). Prints the CPU path, the table and the drafts kept.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import edgellm
from edgellm.bench_serve import prompt_bank
from edgellm.generate import SamplingParams
from edgellm.kernels import cpu
from edgellm.serve.engine import Engine, Request


def run(engine: Engine, prompts: list[list[int]], new: int) -> float:
    done: list[dict] = []
    t0 = time.perf_counter()
    for ids in prompts:
        engine.submit(Request(ids, SamplingParams(max_new_tokens=new),
                              emit=lambda kind, value: done.append(value) if kind == "done" else None))
    engine.run_until_done()
    return sum(d["completion_tokens"] for d in done) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 4, 8, 16])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--draft-k", type=int, default=None, help="fixed draft length (default: adaptive)")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    llm = edgellm.load()
    texts, source = prompt_bank(max(args.streams) * args.rounds)
    prompts = [llm.tokenizer.encode(t) for t in texts]
    parallel = max(args.streams)
    engines = {"plain": Engine(llm.model, llm.tokenizer, parallel=parallel, ctx=512, max_queue=parallel),
               "lookup": Engine(llm.model, llm.tokenizer, parallel=parallel, ctx=512, max_queue=parallel,
                                speculative="lookup", draft_k=args.draft_k)}
    rates: dict[tuple[str, int], list[float]] = {(n, s): [] for n in engines for s in args.streams}
    with torch.inference_mode():
        for r in range(args.rounds):
            for s in args.streams:
                batch = prompts[r * parallel:r * parallel + s]  # new prompts each round: no prefix reuse across rounds
                for name, engine in engines.items():
                    rates[(name, s)].append(run(engine, batch, args.new_tokens))
    print(f"{cpu.summary()}, {torch.get_num_threads()} threads; prompts: {source}; {args.new_tokens} new tokens, "
          f"medians of {args.rounds} rounds; lookup draft length: {args.draft_k or 'adaptive'}")
    print("| streams | plain t/s | lookup t/s | lookup / plain |\n|--:|--:|--:|--:|")
    for s in args.streams:
        plain, lookup = statistics.median(rates[("plain", s)]), statistics.median(rates[("lookup", s)])
        print(f"| {s} | {plain:.1f} | {lookup:.1f} | {lookup / plain:.2f}x |")
    c = engines["lookup"].metrics.counters
    print(f"drafted {c['draft_tokens_total']}, kept {c['draft_tokens_accepted_total']}")


if __name__ == "__main__":
    main()
