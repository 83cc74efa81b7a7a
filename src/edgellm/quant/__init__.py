"""Weight quantization: per-group RTN, AWQ and AWQ+ (quantized lm_head), packed-kernel linears and
AutoAWQ-format checkpoints. See docs/QUANTIZATION.md.

    llm = edgellm.load(dtype="fp32")
    quantize_llm(llm, "awq:w4:g128")          # in place: QLinearPerGrp modules, bf16 compute
    save_quantized(llm, "out/")               # AutoAWQ gemm folder; edgellm.load("out/") reads it back
"""

from .awq import AWQOptions, run_awq
from .calib import CalibConfig, calibration_ids, dataset_text
from .checkpoint import (
    QuantizedCheckpoint,
    describe_model,
    is_quantized_folder,
    load_quantized_llm,
    load_quantized_model,
    pack_awq,
    save_quantized,
    unpack_awq,
)
from .linear import QLinearPerGrp
from .pergroup import QuantizedWeight, fake_quantize, quantize
from .pipeline import QuantResult, quantize_llm, quantize_model
from .spec import QuantSpec, parse_quant

__all__ = [
    "AWQOptions", "CalibConfig", "QLinearPerGrp", "QuantResult", "QuantSpec", "QuantizedCheckpoint",
    "QuantizedWeight", "calibration_ids", "dataset_text", "describe_model", "fake_quantize", "is_quantized_folder",
    "load_quantized_llm", "load_quantized_model", "pack_awq", "parse_quant", "quantize", "quantize_llm",
    "quantize_model", "run_awq", "save_quantized", "unpack_awq",
]
