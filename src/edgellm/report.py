"""Markdown tables (the seeds' tabulate "pipe" look) and JSON output helpers."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return "" if value is None else str(value)
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        return f"{value:.6g}"
    return str(value)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A pipe table: numbers right-aligned, text left-aligned, columns padded like tabulate's 'pipe'."""
    cells = [[_fmt(v) for v in row] for row in rows]
    numeric = [all(isinstance(row[i], int | float) and not isinstance(row[i], bool) for row in rows if
                   row[i] is not None) for i in range(len(headers))]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) + 2 for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        parts = []
        for i, v in enumerate(values):
            inner = widths[i] - 2
            parts.append(" " + (v.rjust(inner) if numeric[i] else v.ljust(inner)) + " ")
        return "|" + "|".join(parts) + "|"

    sep = "|" + "|".join(("-" * (w - 1) + ":") if numeric[i] else ("-" * w) for i, w in enumerate(widths)) + "|"
    return "\n".join([line(headers), sep] + [line(r) for r in cells])


def to_json(obj: Any) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False)
