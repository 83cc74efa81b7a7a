"""`edgellm lm-eval`: lm-evaluation-harness tasks through edgellm's lm-eval model (lm-eval's own CLI cannot
discover outside models). Needs the optional extra: `pip install edgellm[lmeval]`.

By default only edgellm's offline tasks are known (edgellm/eval/lmeval_tasks, data from shared/data) and the
Hugging Face hub is not contacted; `--include-defaults` adds lm-eval's own task library (hub data).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time
from typing import Any

from ..errors import InvalidArgumentError

INSTALL_HINT = "lm-eval is not installed: pip install edgellm[lmeval] (or `make test`, which installs it)"


def parse_model_args(text: str | None) -> dict[str, Any]:
    """lm-eval's `key=value,key=value` model args, values typed as lm-eval types them."""
    if not text:
        return {}
    from lm_eval.utils import simple_parse_args_string

    try:
        return simple_parse_args_string(text)
    except Exception as e:  # a malformed pair
        raise InvalidArgumentError(f"cannot parse --model-args {text!r}: {e}") from e


def _tasks(values: list[str]) -> list[str]:
    tasks = [t.strip() for t in ",".join(values).split(",") if t.strip()]
    if not tasks:
        raise InvalidArgumentError("--tasks names no task")
    return tasks


def cmd_lm_eval(args: argparse.Namespace) -> int:
    try:
        import lm_eval  # noqa: F401
    except ImportError as e:
        raise InvalidArgumentError(INSTALL_HINT) from e
    from .lmeval import EdgeLLM, offline_env, task_manager

    if args.limit is not None and args.limit <= 0:
        raise InvalidArgumentError("--limit must be > 0")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise InvalidArgumentError("--num-fewshot must be >= 0")
    if not args.include_defaults:
        offline_env()
    if not args.verbose:
        logging.getLogger("lm_eval").setLevel(logging.ERROR)
    tasks = _tasks(args.tasks)
    tm = task_manager(args.data_dir, include_defaults=args.include_defaults)
    unknown = [t for t in tasks if t not in tm.all_tasks]
    if unknown:
        raise InvalidArgumentError(f"unknown task(s) {', '.join(unknown)}; edgellm's offline tasks: "
                                   f"{', '.join(t for t in tm.all_tasks if not t.startswith('mmlu_'))} "
                                   "(and mmlu_<subject>)")
    model_args = {"compile": args.compile, **parse_model_args(args.model_args)}
    if args.adapter:
        model_args["adapter"] = args.adapter
    t0 = time.perf_counter()
    lm = EdgeLLM(progress=not args.no_progress, **model_args)
    load_s = time.perf_counter() - t0

    from lm_eval import simple_evaluate

    t1 = time.perf_counter()
    seeds = {} if args.seed is None else {f"{k}seed": args.seed for k in ("random_", "numpy_random_",
                                                                          "torch_random_", "fewshot_random_")}
    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    # lm-eval prints progress notes ("bootstrapping for stddev: bleu") on stdout: keep stdout for the results
    with contextlib.redirect_stdout(sys.stderr):
        results = simple_evaluate(model=lm, tasks=tasks, num_fewshot=args.num_fewshot, limit=limit,
                                  task_manager=tm, log_samples=args.log_samples, bootstrap_iters=args.bootstrap_iters,
                                  **seeds)
    wall_s = time.perf_counter() - t1
    results["config"]["model_args"] = model_args
    results["edgellm"] = {"load_s": round(load_s, 2), "evaluate_s": round(wall_s, 2),
                          "forward_s": round(lm.forward_s, 2),
                          "items": {name: v.get("effective", v.get("original"))
                                    for name, v in results.get("n-samples", {}).items()}}
    if args.output_path:
        _save(results, args.output_path)
    if args.json:
        print(json.dumps({k: v for k, v in results.items() if k != "samples"}, indent=2, default=str))
        return 0
    from lm_eval.utils import make_table

    print(make_table(results))
    if "groups" in results:
        print(make_table(results, "groups"))
    print(f"edgellm {lm.llm.loaded.path.name} [{lm.llm.dtype}]: loaded in {load_s:.1f} s, evaluated in "
          f"{wall_s:.1f} s (forward passes {lm.forward_s:.1f} s)", file=sys.stderr)
    return 0


def _save(results: dict[str, Any], output_path: str) -> None:
    from lm_eval.loggers import EvaluationTracker

    tracker = EvaluationTracker(output_path=output_path)
    samples = results.pop("samples", None)
    tracker.save_results_aggregated(results=results, samples=samples)
    for task, task_samples in (samples or {}).items():
        tracker.save_results_samples(task_name=task, samples=task_samples)


def register(sub: argparse._SubParsersAction) -> None:
    """Add `edgellm lm-eval` to the `edgellm` parser (lm-eval itself is imported only when it runs)."""
    from ..cli import add_compile_args

    p = sub.add_parser("lm-eval", help="lm-evaluation-harness tasks (offline TruthfulQA, TriviaQA, WMT, ARC, "
                                       "MMLU, ...) through edgellm; needs edgellm[lmeval]")
    p.add_argument("--tasks", nargs="+", required=True, help="comma-separated lm-eval task or group names")
    p.add_argument("--model-args", default=None,
                   help="key=value,... e.g. pretrained=model.gguf,dtype=fp32,quant=rtn:w4:g32,batch_tokens=4096")
    p.add_argument("--adapter", default=None, help="a LoRA adapter folder in PEFT's format (model arg adapter=)")
    p.add_argument("--limit", type=float, default=None, help="first N documents per task (a fraction if < 1)")
    p.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: the task's)")
    p.add_argument("--output-path", default=None, help="folder for lm-eval's results JSON (and samples)")
    p.add_argument("--log-samples", action="store_true", help="also write every document's requests/outputs")
    p.add_argument("--data-dir", default=None, help="folder with the task data (default: shared/data)")
    p.add_argument("--include-defaults", action="store_true",
                   help="also offer lm-eval's own tasks (their data comes from the Hugging Face hub)")
    p.add_argument("--bootstrap-iters", type=int, default=100000, help="for standard errors (0: none)")
    p.add_argument("--seed", type=int, default=None,
                   help="one value for lm-eval's random / numpy / torch / few-shot seeds (default: lm-eval's)")
    add_compile_args(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--verbose", action="store_true", help="show lm-eval's log messages")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of tables")
    p.set_defaults(func=cmd_lm_eval)
