"""Read GGUF key/value metadata into plain Python values."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf

from ..errors import CorruptCheckpointError


def open_gguf(path: str | Path) -> gguf.GGUFReader:
    """Open a GGUF file (memory-mapped); a truncated or malformed file raises CorruptCheckpointError."""
    try:
        return gguf.GGUFReader(str(path), "r")
    except Exception as e:  # the gguf package raises ValueError/IndexError/struct errors on bad files
        raise CorruptCheckpointError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from e


def read_metadata(reader: gguf.GGUFReader) -> dict[str, Any]:
    """Every metadata field as str/int/float/bool or a list of those (strings decoded as UTF-8)."""
    out: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            out[key] = field.contents()
        except Exception as e:
            raise CorruptCheckpointError(f"GGUF metadata field {key!r} is unreadable: {e}") from e
    return out
