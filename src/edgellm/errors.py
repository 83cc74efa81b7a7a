"""Typed errors. The CLI turns each into a one-line message and exit code 2."""


class EdgeLLMError(Exception):
    """Base class for every error edgellm raises on bad input."""


class ModelNotFoundError(EdgeLLMError):
    """The --model path, file or hub id does not exist (or is not cached while offline)."""


class CorruptCheckpointError(EdgeLLMError):
    """A GGUF or safetensors file is truncated, malformed or inconsistent with its config."""


class UnsupportedModelError(EdgeLLMError):
    """The checkpoint describes an architecture or feature edgellm does not implement."""


class TokenizerError(EdgeLLMError):
    """The tokenizer is missing or cannot be built."""


class ContextLengthError(EdgeLLMError):
    """The prompt (plus requested new tokens) does not fit the model's context."""


class InvalidArgumentError(EdgeLLMError, ValueError):
    """An argument has an invalid value (e.g. a negative temperature)."""


class DataFormatError(InvalidArgumentError):
    """A training or evaluation data file is missing, malformed or has a bad record (file:line: field)."""
