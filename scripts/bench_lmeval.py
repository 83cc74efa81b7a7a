"""Time one lm-eval task through edgellm and through lm-eval's `hf` model (transformers, fp32, the bundled GGUF
dequantized), back to back in one process, same threads, same task definitions and items.

    python scripts/bench_lmeval.py --tasks arc_easy --limit 100 --threads 2 [--edgellm-dtype auto fp32]

Prints one line per run (wall seconds of simple_evaluate, model loading excluded) and edgellm's speed-up.
"""

from __future__ import annotations

import argparse
import logging
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", default="arc_easy")
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--edgellm-dtype", nargs="+", default=["auto", "fp32"])
    ap.add_argument("--hf-batch-size", type=int, default=32)
    args = ap.parse_args()

    import torch
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    from edgellm.eval.lmeval import EdgeLLM, task_manager
    from edgellm.kernels import cpu
    from edgellm.loading.default import default_model_path

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    tasks, tm = args.tasks.split(","), task_manager()
    gguf = default_model_path()
    print(f"CPU: {cpu.summary()}; torch threads {torch.get_num_threads()}; tasks {tasks}, limit {args.limit}")

    def run(name: str, lm: object) -> float:
        t0 = time.perf_counter()
        r = simple_evaluate(model=lm, tasks=tasks, limit=args.limit, task_manager=tm, bootstrap_iters=0)
        wall = time.perf_counter() - t0
        metrics = {t: {k: round(v, 4) for k, v in r["results"][t].items() if isinstance(v, float)} for t in tasks}
        print(f"{name}: {wall:.1f} s  {metrics}", flush=True)
        return wall

    ours = {d: run(f"edgellm dtype={d}", EdgeLLM(dtype=d, progress=False)) for d in args.edgellm_dtype}
    hf = run("hf float32", HFLM(pretrained=str(gguf.parent), gguf_file=gguf.name, dtype="float32", device="cpu",
                                batch_size=args.hf_batch_size))
    for d, wall in ours.items():
        print(f"edgellm dtype={d} is {hf / wall:.2f}x faster than hf")


if __name__ == "__main__":
    main()
