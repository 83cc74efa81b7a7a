"""`edgellm quantize`: RTN / AWQ / AWQ+ to an AutoAWQ-format folder."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from ..errors import InvalidArgumentError
from .awq import AWQOptions
from .calib import CalibConfig
from .spec import QuantSpec, parse_quant


def register(sub: argparse._SubParsersAction) -> None:
    from ..cli import add_model_args

    p = sub.add_parser("quantize", help="quantize a model (rtn | awq | awqplus) and write an AutoAWQ folder",
                       description="Quantize a model and write safetensors in the AutoAWQ 'gemm' layout "
                                   "(loadable by edgellm, transformers and vLLM).")
    add_model_args(p)
    p.add_argument("--algorithm", "-a", default="awq", help="rtn (alias pergrp) | awq | awqplus (default awq)")
    p.add_argument("--w-bit", "--w_bit", dest="w_bit", type=int, default=4, choices=[3, 4, 8])
    p.add_argument("--group-size", "--group_size", dest="group_size", type=int, default=128,
                   choices=[32, 64, 128, -1], help="-1 = per output channel")
    p.add_argument("--sym", action="store_true", help="symmetric (zero point 2**(bits-1)) instead of min/max")
    p.add_argument("--quant", default=None,
                   help="shorthand instead of the three options above: Q3_0..Q8_0 (symmetric per-channel RTN) "
                        "or e.g. awq:w4:g128")
    p.add_argument("--out", "-o", required=True, help="output folder")
    g = p.add_argument_group("AWQ calibration")
    g.add_argument("--calib", default="wikitext2",
                   help="wikitext2 | ptb (their *valid* splits) or a UTF-8 text file (never a test split)")
    g.add_argument("--calib-samples", type=int, default=128)
    g.add_argument("--calib-seqlen", type=int, default=512)
    g.add_argument("--search-samples", type=int, default=AWQOptions.search_samples,
                   help="calibration sequences used for the grid-search losses (statistics use all)")
    g.add_argument("--no-clip", action="store_true", help="skip the weight-clipping search")
    g.add_argument("--cache-dir", default=None,
                   help="per-layer results for resuming an interrupted run (default: OUT/.awq-cache)")
    g.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.set_defaults(func=cmd_quantize)


def cmd_quantize(args: argparse.Namespace) -> int:
    import torch

    from ..api import load
    from ..loading import parse_dtype
    from ..report import markdown_table
    from .checkpoint import save_quantized
    from .convert import quantized_layers
    from .pipeline import quantize_llm

    spec = parse_quant(args.quant) if args.quant else QuantSpec(args.algorithm, args.w_bit, args.group_size, args.sym)
    if args.calib_samples < 1 or args.calib_seqlen < 16 or args.search_samples < 1:
        raise InvalidArgumentError("--calib-samples and --search-samples must be >= 1, --calib-seqlen >= 16")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    dtype = parse_dtype(args.dtype)
    t0 = time.perf_counter()
    llm = load(args.model, dtype="fp32", rope_type=args.rope_type)  # searches and rounding run in fp32
    print(f"Quantizing {llm.loaded.source} ({llm.config.arch}, {llm.config.num_layers} layers): {spec.label}, "
          f"algorithm {spec.algorithm}", file=sys.stderr)
    if llm.loaded.format == "gguf":
        print("note: the source is a GGUF file; its (possibly already quantized) weights are dequantized and "
              "quantized again", file=sys.stderr)
    calib = CalibConfig(args.calib, args.calib_samples, args.calib_seqlen)
    options = AWQOptions(search_samples=min(args.search_samples, args.calib_samples), clip=not args.no_clip)
    cache = Path(args.cache_dir) if args.cache_dir else out / ".awq-cache"
    result = quantize_llm(llm, spec, calib=calib, options=options, dtype=dtype,
                          cache_dir=cache if spec.needs_calibration else None)
    meta = {"algorithm": spec.algorithm, "source": str(llm.loaded.source), "calibration": result.calibration,
            "search_samples": options.search_samples if spec.needs_calibration else None}
    report = save_quantized(llm, out, meta)
    layers = quantized_layers(llm.model)
    backends: dict[str, int] = {}
    for m in layers.values():
        backends[m.backend] = backends.get(m.backend, 0) + 1
    rows = [["quantized linears", len(layers)],
            ["runtime kernels", ", ".join(f"{k}: {v}" for k, v in backends.items())],
            ["AutoAWQ layers (file group size)", f"{report.awq_layers} (g{report.file_group_size})"],
            ["edgellm sidecar layers", len(report.sidecar_layers)],
            ["size on disk (MB)", round(report.bytes_on_disk / 1e6, 1)],
            ["time (s)", round(time.perf_counter() - t0, 1)]]
    print(markdown_table(["", spec.label], rows))
    for note in report.notes:
        print(f"note: {note}")
    print(f"wrote {out}{os.sep}")
    return 0


# ---------------------------------------------------------------------------------------------- for other verbs
def add_quant_argument(p: argparse.ArgumentParser) -> None:
    """`--quant SPEC` for evaluation verbs: fake-quantize the loaded model before measuring it."""
    p.add_argument("--quant", default=None,
                   help="fake-quantize first: Q3_0..Q8_0 (symmetric per-channel) or rtn|awq|awqplus:wBITS:gGROUP"
                        "[:sym], e.g. rtn:w4:g128 (AWQ calibrates on WikiText-2 valid)")


def apply_quant(llm, spec: str | None) -> str | None:
    """Apply `--quant` to an `edgellm.load()`ed model in place (dequantized weights, same dtype); returns the
    label to show (None when spec is None). Callers caching results must key them on this label too."""
    if not spec:
        return None
    from .pipeline import quantize_llm

    parsed = parse_quant(spec)
    quantize_llm(llm, parsed, fake=True)
    return parsed.label
