"""Resumable per-item result store: an append-only JSONL file, fsync'd after every batch.

Each line is `{"key": <sha256 hex>, "value": <json>}`. The key hashes everything that determines the item's
result (model identity, dtype, protocol, the item's own token ids or text), so a store can be shared by many
runs and a resumed run simply skips the keys it finds. A line cut short by a crash (kill -9 mid-write) does
not parse and is ignored; that item is computed again.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..errors import InvalidArgumentError


def default_cache_dir() -> Path:
    """`$EDGELLM_CACHE_DIR`, else `$XDG_CACHE_HOME/edgellm/eval`, else `~/.cache/edgellm/eval`."""
    env = os.environ.get("EDGELLM_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "edgellm" / "eval"


def item_key(*parts: Any) -> str:
    """A stable sha256 of JSON-serialisable parts (lists of ints are hashed as JSON, cheap enough)."""
    h = hashlib.sha256()
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode())
        h.update(b"\x1e")
    return h.hexdigest()


class ResultStore:
    """Results of finished items of one kind of run (`name`), kept in `<cache_dir>/<name>.jsonl`.

    `cache_dir=None` gives an in-memory store (nothing written, nothing resumed).
    """

    def __init__(self, cache_dir: str | Path | None, name: str) -> None:
        self.values: dict[str, Any] = {}
        self.path: Path | None = None
        if cache_dir is None:
            return
        folder = Path(cache_dir).expanduser()
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise InvalidArgumentError(f"cannot create cache directory {folder}: {e}") from e
        self.path = folder / f"{name}.jsonl"
        if self.path.is_file():
            self._load()

    def _load(self) -> None:
        assert self.path is not None
        with open(self.path, "rb") as f:
            for raw in f:
                if not raw.endswith(b"\n"):
                    break  # the last line of a run killed mid-write
                try:
                    rec = json.loads(raw)
                    self.values[rec["key"]] = rec["value"]
                except (ValueError, KeyError, TypeError):
                    continue

    def __contains__(self, key: str) -> bool:
        return key in self.values

    def __len__(self) -> int:
        return len(self.values)

    def get(self, key: str) -> Any:
        return self.values.get(key)

    def put_many(self, items: Iterable[tuple[str, Any]]) -> None:
        """Record results and make them durable (one write + fsync for the whole batch)."""
        items = list(items)
        for key, value in items:
            self.values[key] = value
        if self.path is None or not items:
            return
        data = "".join(json.dumps({"key": k, "value": v}, separators=(",", ":"), ensure_ascii=False) + "\n"
                       for k, v in items).encode()
        with open(self.path, "ab") as f:
            # a torn last line from a killed run must not glue onto our first record
            if f.tell() > 0:
                with open(self.path, "rb") as r:
                    r.seek(-1, os.SEEK_END)
                    if r.read(1) != b"\n":
                        data = b"\n" + data
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
