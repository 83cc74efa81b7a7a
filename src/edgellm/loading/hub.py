"""Hub ids via huggingface_hub: `org/name` (safetensors repo) or `org/name:file.gguf` (one GGUF file).

The local cache (HF_HUB_CACHE) is honoured; with HF_HUB_OFFLINE=1 only cached files are used, and a missing
one is a clear ModelNotFoundError instead of a traceback.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import ModelNotFoundError

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(:[\w./-]+\.gguf)?$")
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model"]


def looks_like_hub_id(value: str) -> bool:
    """`org/name` or `org/name:file.gguf` (a relative path such as `./x/y` or `~/x` is not one)."""
    return bool(_HUB_ID.match(value)) and not value.startswith((".", "/", "~"))


def _reason(e: BaseException) -> str:
    first = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
    return f"{type(e).__name__}: {first[:200]}" if first else type(e).__name__


def download_from_hub(model_id: str) -> Path:
    """The local path of a hub model (a snapshot folder, or one GGUF file), from the cache or downloaded."""
    try:
        import huggingface_hub
        from huggingface_hub import constants
    except ImportError as e:  # a core dependency, but say so plainly if it is broken
        raise ModelNotFoundError(f"cannot load hub id {model_id!r}: huggingface_hub is not installed") from e
    repo, _, filename = model_id.partition(":")
    offline = bool(constants.HF_HUB_OFFLINE)
    try:
        if filename:
            path = Path(huggingface_hub.hf_hub_download(repo, filename, local_files_only=offline))
        else:
            path = Path(huggingface_hub.snapshot_download(repo, allow_patterns=ALLOW_PATTERNS,
                                                          local_files_only=offline))
    except Exception as e:  # LocalEntryNotFoundError, RepositoryNotFoundError, connection errors, ...
        why = "HF_HUB_OFFLINE=1 and it is not in the local cache" if offline else _reason(e)
        raise ModelNotFoundError(
            f"model {model_id!r} not found: no such local path, and the hub copy is unavailable ({why}; "
            f"cache: {constants.HF_HUB_CACHE})"
        ) from e
    if not filename and not (path / "config.json").is_file():
        raise ModelNotFoundError(
            f"hub model {model_id!r} has no config.json in {path}; for a GGUF repo name one file: "
            f"{repo}:<file>.gguf"
        )
    return path
