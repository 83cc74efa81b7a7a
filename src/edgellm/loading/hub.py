"""Hub ids via huggingface_hub: `org/name` (safetensors repo) or `org/name:file.gguf` (one GGUF file).

The local cache is honoured; with HF_HUB_OFFLINE=1 (or no network) only cached files are used, and a
missing one is a clear ModelNotFoundError instead of a traceback.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import ModelNotFoundError

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(:[\w./-]+\.gguf)?$")
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model"]


def looks_like_hub_id(value: str) -> bool:
    return bool(_HUB_ID.match(value)) and not value.startswith((".", "/", "~"))


def download_from_hub(model_id: str) -> Path:
    try:
        import huggingface_hub
        from huggingface_hub import constants
    except ImportError as e:  # a core dependency, but say so plainly if it is broken
        raise ModelNotFoundError(f"cannot load hub id {model_id!r}: huggingface_hub is not installed") from e
    repo, _, filename = model_id.partition(":")
    offline = bool(constants.HF_HUB_OFFLINE)
    try:
        if filename:
            return Path(huggingface_hub.hf_hub_download(repo, filename, local_files_only=offline))
        return Path(huggingface_hub.snapshot_download(repo, allow_patterns=ALLOW_PATTERNS,
                                                      local_files_only=offline))
    except Exception as e:  # LocalEntryNotFoundError, RepositoryNotFoundError, connection errors, ...
        why = "offline and not in the local cache" if offline else type(e).__name__
        hint = (f" (cache: {constants.HF_HUB_CACHE}; set HF_HUB_OFFLINE=0 when online, "
                "or pass a local path)")
        raise ModelNotFoundError(f"hub model {model_id!r} unavailable: {why}{hint}") from e
