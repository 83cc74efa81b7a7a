"""One entry point: quantize a loaded model in place (RTN, AWQ or AWQ+), for real or as fake quantization."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..memory import release_free_memory
from ..model import Transformer
from .awq import AWQOptions, LayerResult, ProgressFn, run_awq
from .calib import CalibConfig, calibration_ids
from .convert import finish_floats, install, linear_names, rtn_weights
from .spec import QuantSpec, parse_quant

if TYPE_CHECKING:
    from ..api import LLM


@dataclass
class QuantResult:
    spec: QuantSpec
    seconds: float
    n_quantized: int
    calibration: str | None = None
    awq_layers: list[LayerResult] = field(default_factory=list)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def quantize_model(model: Transformer, spec: QuantSpec, tokenizer=None, *, calib: CalibConfig | None = None,
                   options: AWQOptions | None = None, dtype: torch.dtype = torch.bfloat16, fake: bool = False,
                   cache_dir: Path | None = None, log: Callable[[str], None] = _log,
                   progress: ProgressFn | None = None) -> QuantResult:
    """Quantize `model` in place and leave it in `dtype`.

    Rounding always reads fp32 copies of the weights, one linear at a time, and each quantized layer replaces
    its float one before the next is read, so peak memory is the model plus one layer (RTN never holds an
    fp32 model; load with dtype="fp32" to avoid a bf16 round trip of the source weights). AWQ's searches
    run on the model upcast to fp32. `fake=True` keeps nn.Linear layers holding the dequantized weights;
    otherwise they become QLinearPerGrp modules that compute with packed weights.
    """
    t0 = time.perf_counter()
    result = QuantResult(spec, 0.0, 0)
    if spec.needs_calibration:
        if tokenizer is None:
            raise ValueError("AWQ needs the tokenizer to build calibration data")
        model.float()
        calib = calib or CalibConfig()
        ids = calibration_ids(tokenizer, calib)
        result.calibration = calib.describe()
        log(f"AWQ: calibrating on {result.calibration}")
        result.awq_layers = run_awq(model, ids, spec, options, cache_dir, log, progress)
    names = linear_names(model, spec.quantize_lm_head)
    install(model, rtn_weights(model, spec), dtype, fake=fake)
    finish_floats(model, dtype, skip=tuple(names))
    result.n_quantized = len(names)
    release_free_memory()  # the float weights and fp32 scratch just replaced
    result.seconds = time.perf_counter() - t0
    return result


def quantize_llm(llm: LLM, spec: QuantSpec | str, **kwargs) -> QuantResult:
    """`quantize_model` on an `edgellm.load()`ed model; `spec` may be a string such as "Q4_0" or "awq:w4:g128".

    Keyword `dtype` defaults to the model's current dtype."""
    if isinstance(spec, str):
        spec = parse_quant(spec)
    kwargs.setdefault("dtype", llm.dtype)
    return quantize_model(llm.model, spec, llm.tokenizer, **kwargs)
