"""edgellm: run, quantize, evaluate and benchmark Llama-family models on a laptop CPU."""

from .api import LLM, load
from .config import ModelConfig
from .errors import (
    ContextLengthError,
    CorruptCheckpointError,
    EdgeLLMError,
    InvalidArgumentError,
    ModelNotFoundError,
    TokenizerError,
    UnsupportedModelError,
)
from .generate import GenerationStats, SamplingParams

__version__ = "0.1.0"
__all__ = [
    "LLM", "load", "ModelConfig", "SamplingParams", "GenerationStats", "EdgeLLMError", "ModelNotFoundError",
    "CorruptCheckpointError", "UnsupportedModelError", "TokenizerError", "ContextLengthError",
    "InvalidArgumentError",
]
