"""What to quantize and how: `QuantSpec`, and the spellings users type (`Q4_0`, `awq:w4:g128`, ...)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import InvalidArgumentError

ALGORITHMS = ("rtn", "awq", "awqplus")
ALIASES = {"pergrp": "rtn", "awq+": "awqplus", "awq_plus": "awqplus"}


@dataclass(frozen=True)
class QuantSpec:
    """`rtn` (the seeds' "pergrp"): per-group min/max round-to-nearest of every linear, lm_head included.
    `awq`: activation-aware scales + clipping, lm_head left in float. `awqplus`: AWQ + per-group lm_head."""

    algorithm: str = "rtn"
    w_bit: int = 4
    group_size: int = 128     # -1 = one group per output channel
    sym: bool = False

    def __post_init__(self) -> None:
        algo = ALIASES.get(self.algorithm, self.algorithm)
        object.__setattr__(self, "algorithm", algo)
        if algo not in ALGORITHMS:
            raise InvalidArgumentError(f"unknown algorithm {self.algorithm!r}; choose from {', '.join(ALGORITHMS)}")
        if not 2 <= self.w_bit <= 8:
            raise InvalidArgumentError(f"w_bit must be between 2 and 8 (got {self.w_bit})")
        if self.group_size != -1 and self.group_size < 8:
            raise InvalidArgumentError(f"group_size must be -1 (per channel) or >= 8 (got {self.group_size})")

    @property
    def quantize_lm_head(self) -> bool:
        return self.algorithm in ("rtn", "awqplus")

    @property
    def needs_calibration(self) -> bool:
        return self.algorithm in ("awq", "awqplus")

    @property
    def label(self) -> str:
        """Short column label, as in the seeds' table: "w4 g128", "AWQ g128", "AWQ+ g128"."""
        g = "per-channel" if self.group_size == -1 else f"g{self.group_size}"
        name = {"rtn": f"w{self.w_bit}", "awq": "AWQ", "awqplus": "AWQ+"}[self.algorithm]
        if self.algorithm != "rtn" and self.w_bit != 4:
            name += f" w{self.w_bit}"
        return f"{name} {g}" + (" sym" if self.sym else "")


_QN_0 = re.compile(r"^q([2-8])_0$")
_LONG = re.compile(r"^(?P<algo>[a-z_+]+)(?::w(?P<bits>\d))?(?::g(?P<group>-?\d+))?(?P<sym>:sym)?$")


def parse_quant(text: str) -> QuantSpec:
    """`Q3_0`..`Q8_0` -> symmetric per-channel RTN (the seeds' transformerx fake-quant modes);
    `ALGO[:wBITS][:gGROUP][:sym]`, e.g. `rtn:w4:g128`, `awq:w4:g128`, `awqplus:w3:g64:sym`."""
    t = text.strip().lower()
    m = _QN_0.match(t)
    if m:
        return QuantSpec("rtn", int(m.group(1)), -1, sym=True)
    m = _LONG.match(t)
    if not m:
        raise InvalidArgumentError(f"cannot parse quantization {text!r}; use Q3_0..Q8_0 or e.g. rtn:w4:g128, "
                                   "awq:w4:g128, awqplus:w4:g128[:sym]")
    return QuantSpec(m.group("algo"), int(m.group("bits") or 4), int(m.group("group") or 128),
                     sym=bool(m.group("sym")))
