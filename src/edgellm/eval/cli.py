"""CLI verbs for evaluation: `edgellm perplexity`, `edgellm mmlu`, `edgellm reasoning`.

Each verb accepts several `--model`s (rows of the printed table), caches every finished item under
`--cache-dir` (default ~/.cache/edgellm/eval) so an interrupted run resumes where it stopped, prints a
markdown table (or, with `--json`, one JSON object), and turns bad input into a one-line error (exit 2).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from ..errors import InvalidArgumentError
from ..report import markdown_table
from .cache import ResultStore, default_cache_dir
from .engine import DEFAULT_BATCH_TOKENS


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", action="extend", nargs="+", default=None,
                   help="GGUF file, HF folder or hub id; several give one table row each "
                        "(default: bundled SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32", "fp16"],
                   help="compute dtype (auto: bf16 on CPUs with native bf16, else fp32)")
    p.add_argument("--rope-type", "--rope_type", dest="rope_type", default=None,
                   choices=["simple", "llama3.1", "llama3.2"], help="override the checkpoint's RoPE scaling")
    p.add_argument("--adapter", default=None, help="a LoRA adapter folder in PEFT's format")
    p.add_argument("--cache-dir", default=None,
                   help=f"where finished items are kept for resuming (default: {default_cache_dir()})")
    p.add_argument("--no-cache", action="store_true", help="keep results in memory only (no resume)")
    p.add_argument("--batch-tokens", type=int, default=DEFAULT_BATCH_TOKENS,
                   help=f"tokens per forward pass (default: {DEFAULT_BATCH_TOKENS})")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")


def _store(args: argparse.Namespace, name: str) -> ResultStore:
    if args.no_cache:
        return ResultStore(None, name)
    return ResultStore(args.cache_dir or default_cache_dir(), name)


def _load(model: str | None, args: argparse.Namespace) -> Any:
    from ..api import load

    if args.batch_tokens < 1:
        raise InvalidArgumentError("--batch-tokens must be >= 1")
    if args.threads is not None:
        if args.threads < 1:
            raise InvalidArgumentError("--threads must be >= 1")
        import torch

        torch.set_num_threads(args.threads)
    # "auto" keeps a GGUF's quantized blocks, except when --quant re-quantizes from float weights
    keep = None if not getattr(args, "quant", None) else False
    return load(model, dtype=args.dtype, rope_type=args.rope_type, keep_quantized=keep,
                adapter=getattr(args, "adapter", None))


def _name(model: str | None, args: argparse.Namespace | None = None) -> str:
    name = model or "SmolLM2-135M-Instruct (default)"
    adapter = getattr(args, "adapter", None)
    if adapter:  # cached results must follow the adapter's weights, not just its folder name
        from ..lora import adapter_fingerprint

        name += f" + adapter {adapter} ({adapter_fingerprint(adapter)})"
    return name


def _progress(args: argparse.Namespace) -> bool:
    return not args.no_progress


def _note(args: argparse.Namespace, text: str) -> None:
    if not args.json:
        print(text, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- perplexity
def cmd_perplexity(args: argparse.Namespace) -> int:
    from .data import load_corpus
    from .perplexity import evaluate_perplexity

    store = _store(args, "perplexity")
    results = []
    models = args.model or [None]
    for model in models:
        llm = _load(model, args)
        for data in args.data:
            corpus = load_corpus(data, split=args.split, protocol=args.protocol, data_dir=args.data_dir)
            t = time.perf_counter()
            ids = llm.tokenizer.encode(corpus.text)
            _note(args, f"{_name(model, args)} [{llm.dtype}] {corpus.name}: {len(ids)} tokens "
                        f"({time.perf_counter() - t:.1f} s to tokenize), protocol {args.protocol}")
            for seqlen in args.seqlen:
                r = evaluate_perplexity(llm, ids, seqlen, protocol=args.protocol, nsamples=args.nsamples,
                                        store=store, batch_tokens=args.batch_tokens, progress=_progress(args),
                                        data=corpus.name, source=corpus.source, model_name=_name(model, args))
                _note(args, f"  seqlen {seqlen}: PPL {r.ppl:.4f} over {r.windows} windows "
                            f"({r.tokens_scored} tokens scored) in {r.wall_s:.1f} s")
                results.append(r)
    if args.json:
        print(json.dumps({"command": "perplexity", "results": [r.to_dict() for r in results]}, indent=2))
        return 0
    for data in dict.fromkeys(r.data for r in results):
        rows = []
        for model in dict.fromkeys(r.model for r in results):
            by = {r.seqlen: r for r in results if r.model == model and r.data == data}
            rows.append([f"`{model}`"] + [f"{by[s].ppl:.3f}" if s in by else "" for s in args.seqlen])
        dtype = results[0].dtype
        print(f"\n{data} perplexity ({args.protocol} protocol, {dtype}"
              f"{', first ' + str(args.nsamples) + ' windows' if args.nsamples else ''})\n")
        print(markdown_table(["Model"] + [str(s) for s in args.seqlen], rows))
    return 0


# ---------------------------------------------------------------------------------------------- MMLU
def cmd_mmlu(args: argparse.Namespace) -> int:
    from .mmlu import evaluate_mmlu

    store = _store(args, "mmlu")
    results = []
    for model in args.model or [None]:
        llm = _load(model, args)
        for maxlen in args.maxlen:
            r = evaluate_mmlu(llm, shot=args.shot, maxlen=maxlen, subjects=args.subjects, limit=args.limit,
                              data_dir=args.data, scoring=args.scoring, store=store,
                              batch_tokens=args.batch_tokens, progress=_progress(args), model_name=_name(model, args))
            _note(args, f"{_name(model, args)} maxlen {maxlen}: total macro-average / total micro-average = "
                        f"{r.macro:.4f} / {r.micro:.4f} ({r.correct}/{r.total}, {r.wall_s:.1f} s)")
            results.append(r)
    if args.json:
        print(json.dumps({"command": "mmlu", "results": [r.to_dict() for r in results]}, indent=2))
        return 0
    last = results[-1]
    if not args.summary_only:
        print(f"\nMMLU {last.shot}-shot, scoring {last.scoring}, maxlen {last.maxlen}: {last.model}\n")
        print(markdown_table(["Subject", "Category", "Correct", "Questions", "Accuracy"],
                             [[s, v["category"], v["correct"], v["total"], round(v["acc"], 4)]
                              for s, v in last.subjects.items()]))
        print()
        print(markdown_table(["Category", "Macro-average", "Micro-average", "Questions"],
                             [[c, round(v["macro"], 4), round(v["micro"], 4), v["total"]]
                              for c, v in last.categories.items()]))
    print(f"\nMMLU ({last.shot}-shot, scoring {last.scoring}): total macro-average / total micro-average\n")
    rows = []
    for model in dict.fromkeys(r.model for r in results):
        by = {r.maxlen: r for r in results if r.model == model}
        rows.append([f"`{model}`"] + [f"{by[m].macro:.4f} / {by[m].micro:.4f}" if m in by else ""
                                      for m in args.maxlen])
    print(markdown_table(["Model"] + [str(m) for m in args.maxlen], rows))
    return 0


# ---------------------------------------------------------------------------------------------- reasoning
def cmd_reasoning(args: argparse.Namespace) -> int:
    from .data import REASONING_TASKS, TASK_ALIASES
    from .reasoning import evaluate_task

    tasks = [TASK_ALIASES.get(t.strip(), t.strip()) for t in ",".join(args.tasks).split(",") if t.strip()]
    unknown = [t for t in tasks if t not in REASONING_TASKS]
    if unknown or not tasks:
        raise InvalidArgumentError(f"unknown task(s) {', '.join(unknown) or '(none)'}; "
                                   f"choose from {', '.join(REASONING_TASKS)}")
    modes = tuple(m.strip() for m in args.mode.split(",") if m.strip())
    store = _store(args, "reasoning")
    results = []
    for model in args.model or [None]:
        llm = _load(model, args)
        for task in tasks:
            r = evaluate_task(llm, task, shot=args.shot, modes=modes, limit=args.limit, data_dir=args.data_dir,
                              store=store, batch_tokens=args.batch_tokens, progress=_progress(args),
                              model_name=_name(model, args))
            _note(args, f"{_name(model, args)} {task}: " + ", ".join(f"{k} {v:.4f}" for k, v in r.metrics.items())
                  + f" ({r.items} items, {r.wall_s:.1f} s)")
            results.append(r)
    if args.json:
        print(json.dumps({"command": "reasoning", "results": [r.to_dict() for r in results]}, indent=2))
        return 0
    cols = [c for c in ("mc_acc", "mc_acc_argmax", "ll_acc", "ll_acc_norm") if c in results[0].metrics]
    print(f"\nReasoning, {args.shot}-shot\n")
    print(markdown_table(["Model", "Task", "Items"] + cols + ["Wall (s)"],
                         [[f"`{r.model}`", r.task, r.items] + [round(r.metrics[c], 4) for c in cols]
                          + [round(r.wall_s, 1)] for r in results]))
    return 0


# ---------------------------------------------------------------------------------------------- parser
def _positive(value: str) -> int:
    try:
        n = int(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from e
    if n < 1:
        raise argparse.ArgumentTypeError(f"{value!r} must be >= 1")
    return n


def register(sub: argparse._SubParsersAction) -> None:
    """Add the evaluation verbs to the `edgellm` parser."""
    p = sub.add_parser("perplexity", help="perplexity on WikiText-2 / PTB / a text file, by seqlen")
    _add_common(p)
    p.add_argument("--data", nargs="+", default=["wikitext2"],
                   help="wikitext2, ptb or a local text file (several allowed)")
    p.add_argument("--data-dir", default=None, help="folder with wikitext-2-raw/ and ptb/ (default: shared/data)")
    p.add_argument("--split", default="test", choices=["test", "valid"])
    p.add_argument("--seqlen", type=_positive, nargs="+", default=[2048], help="window length(s)")
    p.add_argument("--nsamples", type=_positive, default=None, help="score only the first N windows")
    p.add_argument("--protocol", default="gptq", choices=["gptq", "llamacpp"],
                   help="gptq: score every token of each window; llamacpp: only the second half")
    p.set_defaults(func=cmd_perplexity)

    p = sub.add_parser("mmlu", help="MMLU accuracy (Hendrycks prompt), per subject and category")
    _add_common(p)
    p.add_argument("--shot", type=int, default=5, help="few-shot examples from the dev split (0-5)")
    p.add_argument("--maxlen", type=_positive, nargs="+", default=[2048],
                   help="maximum prompt length(s) in tokens; shots are dropped to fit")
    p.add_argument("--subjects", nargs="+", default=None, help="subset of subjects (default: all 57)")
    p.add_argument("--limit", type=_positive, default=None, help="first N test questions per subject")
    p.add_argument("--data", default=None, help="MMLU folder with dev/ and test/ (default: shared/data/mmlu)")
    p.add_argument("--scoring", default="logits", choices=["logits", "argmax"],
                   help="logits: best of the four letter tokens; argmax: decoded argmax over the vocabulary")
    p.add_argument("--summary-only", action="store_true", help="print only the macro/micro table")
    p.set_defaults(func=cmd_mmlu)

    p = sub.add_parser("reasoning", help="ARC, PIQA, HellaSwag, CommonsenseQA, BoolQ, WinoGrande accuracy")
    _add_common(p)
    p.add_argument("--tasks", nargs="+", default=["arc_e,arc_c,piqa,hellaswag,commonsense_qa,boolq,winogrande"],
                   help="comma-separated task names")
    p.add_argument("--shot", type=int, default=0, help="few-shot examples")
    p.add_argument("--mode", default="mc,ll",
                   help="mc (lettered prompt), ll (log-likelihood of each continuation), or both")
    p.add_argument("--limit", type=_positive, default=None, help="first N items per task")
    p.add_argument("--data-dir", default=None, help="folder with the task data (default: shared/data)")
    p.set_defaults(func=cmd_reasoning)
