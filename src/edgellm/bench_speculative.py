"""`edgellm bench --task speculative`: the seeds' K sweep. For each method, task and draft length K: acceptance
rate, mean accepted length, decode tokens/s and the speed-up over plain decoding of the same target, timed in
the same process, interleaved round by round (medians of --repeat rounds).

Answers end where the model ends them (at most --new-tokens), as users get them: past its end-of-turn token the
default model writes a made-up next conversation, which would turn the input-grounded task into a chat task for
its last tokens. `--ignore-eos` times fixed-length answers instead (llama.cpp's `-n N --ignore-eos` rows)."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import asdict, dataclass, field

import torch

from .kernels import cpu
from .report import markdown_table

PASSAGE = (
    "The Amazon rainforest covers much of the Amazon basin of South America. This basin encompasses seven "
    "million square kilometers, of which five and a half million square kilometers are covered by the "
    "rainforest. The region includes territory belonging to nine nations and 3,344 formally acknowledged "
    "indigenous territories. The majority of the forest, 60%, is in Brazil, followed by Peru with 13%, Colombia "
    "with 10%, and with minor amounts in Bolivia, Ecuador, French Guiana, Guyana, Suriname, and Venezuela.")
CODE = '''def mean(values):
    total = 0
    for v in values:
        total = total + v
    return total / len(values)


def variance(values):
    m = mean(values)
    total = 0
    for v in values:
        total = total + (v - m) ** 2
    return total / len(values)
'''
TASKS = {
    # the answer is new text: drafts must guess it
    "chat": ["What is the meaning of life?", "Tell me something you don't know."],
    # the answer reuses its input (rewrite a passage, edit given code): prompt lookup's case
    "grounded": [f"Repeat the following passage, correcting nothing:\n\n{PASSAGE}",
                 f"Rename the function `mean` to `average` in this code and show the whole code:\n\n{CODE}"],
}


@dataclass
class SweepRow:
    method: str
    task: str
    k: str                      # "1".."16" or "adaptive"
    tokens_per_s: float = 0.0   # median over rounds of the per-run decode rate
    plain_tokens_per_s: float = 0.0
    speedup: float = 0.0
    acceptance_rate: float = 0.0
    mean_accepted: float = 0.0
    identical: str = ""         # prompts whose text equals plain decoding's, e.g. "2/2"
    new_tokens: float = 0.0     # mean answer length (tokens)
    runs: list[float] = field(default_factory=list)


def _decode_rate(llm, ids: list[int], new: int, ignore_eos: bool) -> tuple[float, list[int], object]:
    from .generate import SamplingParams

    out = list(llm.generator.token_stream(ids, SamplingParams(max_new_tokens=new, ignore_eos=ignore_eos)))
    s = llm.generator.stats
    return s.tokens_per_s, out, s


def sweep(method: str, target, plain, prompts: dict[str, list[list[int]]], ks: list[int | None], new: int,
          repeat: int, log, ignore_eos: bool = False) -> list[SweepRow]:
    """target: an LLM with a Speculator whose k this sets per row; plain: the same weights decoding plainly."""
    rows = []
    for task, task_prompts in prompts.items():
        # also compiles what plain needs
        reference = [_decode_rate(plain, ids, new, ignore_eos)[1] for ids in task_prompts]
        for k in ks:
            target.generator.speculator.k = k
            for ids in task_prompts:  # compile (or load) the verify sizes this K needs before timing
                _decode_rate(target, ids, new, ignore_eos)
            row = SweepRow(method, task, str(k) if k else "adaptive")
            spec_rates, plain_rates, acc, mean_acc, same = [], [], [], [], 0
            for r in range(repeat):
                for i, ids in enumerate(task_prompts):
                    rate, out, s = _decode_rate(target, ids, new, ignore_eos)
                    spec_rates.append(rate)
                    acc.append(s.acceptance_rate)
                    mean_acc.append(s.mean_accepted)
                    same += r == 0 and out == reference[i]
                    plain_rates.append(_decode_rate(plain, ids, new, ignore_eos)[0])
            row.tokens_per_s = statistics.median(spec_rates)
            row.plain_tokens_per_s = statistics.median(plain_rates)
            row.speedup = row.tokens_per_s / row.plain_tokens_per_s
            row.acceptance_rate = statistics.mean(acc)
            row.mean_accepted = statistics.mean(mean_acc)
            row.identical = f"{same}/{len(task_prompts)}"
            row.new_tokens = statistics.mean(len(r) for r in reference)
            row.runs = spec_rates
            log(f"{method} {task} K={row.k}: {row.tokens_per_s:.1f} t/s vs {row.plain_tokens_per_s:.1f} plain "
                f"({row.speedup:.2f}x), acceptance {row.acceptance_rate:.2f}")
            rows.append(row)
    return rows


def run(args: argparse.Namespace) -> int:
    from .api import load
    from .speculative import K_STEPS, target_load_options

    methods = args.speculative or (["lookup", "self"] + (["draft"] if args.draft_model else []))
    ks: list[int | None] = list(args.draft_k or K_STEPS) + [None]
    log = (lambda s: print(s, file=sys.stderr)) if not args.json else (lambda s: None)
    ignore_eos = bool(getattr(args, "ignore_eos", False))
    rows: list[SweepRow] = []
    targets = {}
    for method in methods:
        key = target_load_options(method, args.dtype, None)  # the target's (dtype, keep_quantized)
        plain = targets.get(key)
        if plain is None:
            plain = targets[key] = load(args.model, dtype=key[0], compile=args.compile, keep_quantized=key[1])
        target = load(args.model, dtype=args.dtype, compile=args.compile, speculative=method,
                      draft_model=args.draft_model if method == "draft" else None)
        prompts = {task: [target.chat_prompt_ids([{"role": "user", "content": p}]) for p in ps]
                   for task, ps in TASKS.items()}
        log(f"{method}: target {target.dtype} ({'dequantized' if method == 'self' else target.loaded.format}), "
            f"K sweep {ks[:-1]} + adaptive, {args.new_tokens} new tokens, {args.repeat} rounds")
        rows += sweep(method, target, plain, prompts, ks, args.new_tokens, args.repeat, log, ignore_eos)
        del target
    meta = {"cpu": cpu.cpu_name(), "cpu_path": cpu.summary(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "task": "speculative", "new_tokens": args.new_tokens, "ignore_eos": ignore_eos,
            "repeat": args.repeat}
    if args.json:
        print(json.dumps({**meta, "rows": [asdict(r) for r in rows]}, indent=2))
        return 0
    length = f"{args.new_tokens} new tokens" if ignore_eos else f"answers of at most {args.new_tokens} tokens"
    print(f"\nSpeculative decoding — {meta['cpu_path']}, {meta['threads']} threads, {length}, "
          f"medians of {args.repeat} rounds")
    headers = ["method", "task", "K", "tokens", "acceptance", "mean accepted", "t/s", "plain t/s", "speed-up",
               "same text"]
    print(markdown_table(headers, [[r.method, r.task, r.k, f"{r.new_tokens:.0f}", f"{r.acceptance_rate:.2f}",
                                    f"{r.mean_accepted:.2f}", f"{r.tokens_per_s:.1f}", f"{r.plain_tokens_per_s:.1f}",
                                    f"{r.speedup:.2f}", r.identical] for r in rows]))
    return 0
