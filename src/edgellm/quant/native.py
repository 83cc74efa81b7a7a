"""Our one C kernel (`dequant_int4.c`): torch's packed int4 layout -> transposed bf16 weight, for prefill.

Built on first use with the system C compiler (`$CC`, else cc/gcc/clang; `-O3 -march=native -fopenmp`),
cached in `~/.cache/edgellm/native/` under a hash of the source, compiler, flags and CPU, loaded with ctypes,
and checked against torch's own packer and the reference dequantization before it is used. Without a
compiler, or if any of that fails, `int4_dequantizer()` returns None and callers keep the eager path.
`EDGELLM_NATIVE=0` turns it off.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from . import kernels

SOURCE = Path(__file__).with_name("dequant_int4.c")
FLAG_SETS = (["-O3", "-march=native", "-fopenmp"], ["-O3", "-march=native"], ["-O3"])
# why it is off, for notes ("" while it is on or untried)
reason: str = ""

Dequantizer = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int, int, int, int, int, int], torch.Tensor]


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_flags() -> str:
    try:
        return next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")), "")
    except OSError:
        return ""


def _build(cc: str) -> Path:
    """Compile (or reuse) the shared library; raises on failure."""
    from ..fast import cache_root

    src = SOURCE.read_bytes()
    cc_id = f"{cc}:{os.stat(cc).st_mtime_ns}"
    errors = []
    for flags in FLAG_SETS:
        key = hashlib.sha256(src + f"|{cc_id}|{flags}|{_cpu_flags()}".encode()).hexdigest()[:24]
        lib = cache_root() / "native" / f"dequant_int4-{key}.so"
        if lib.exists():
            return lib
        lib.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
            tmp_lib = Path(tmp) / lib.name
            r = subprocess.run([cc, *flags, "-shared", "-fPIC", "-o", str(tmp_lib), str(SOURCE)],
                               capture_output=True, text=True)
            if r.returncode == 0:
                os.replace(tmp_lib, lib)  # atomic: a concurrent process sees a whole file or none
                return lib
            last = r.stderr.strip().splitlines()[-1:] or [f"exit status {r.returncode}"]
            errors.append(f"{cc} {' '.join(flags)}: {last[0]}")
    raise RuntimeError("; ".join(errors))


def _wrap(fn: ctypes._CFuncPtr) -> Dequantizer:
    def dequant_t(packed: torch.Tensor, scales16: torch.Tensor, zeros: torch.Tensor, k: int, k_pad: int,
                  n0: int, n1: int, group: int, shift: int) -> torch.Tensor:
        """Rows n0:n1 (n0 % 64 == 0) of the weight in torch's packed int4 layout, as W^T (k, n1 - n0) bf16.
        scales16: float16 scales as int16 (N, ng); zeros: uint8 (N, ng); group: columns per scale."""
        n, ng = scales16.shape
        if n0 % kernels.N_BLOCK or not 0 <= n0 < n1 <= n or packed.shape != (kernels.pad_to(n, kernels.N_BLOCK),
                                                                             k_pad // 2):
            raise ValueError(f"bad int4 dequant request: rows {n0}:{n1} of {n}, packed {tuple(packed.shape)}")
        for t, dt in ((packed, torch.uint8), (scales16, torch.int16), (zeros, torch.uint8)):
            if t.dtype != dt or not t.is_contiguous():
                raise ValueError(f"int4 dequant needs contiguous {dt}, got {t.dtype}")
        out = torch.empty(k, n1 - n0, dtype=torch.bfloat16)
        fn(packed.data_ptr(), scales16.data_ptr(), zeros.data_ptr(), out.data_ptr(), k, k_pad, n0, n1, n, ng,
           group, shift, torch.get_num_threads())
        return out

    return dequant_t


def _self_check(dequant_t: Dequantizer) -> bool:
    """Compare with torch's packer + the reference formula on odd shapes (partial last block, K padding,
    a short last group, a row window, 3-bit shift)."""
    g = torch.Generator().manual_seed(3)
    for n, k, group, k_pad, shift, n0, n1 in ((130, 96, 32, 96, 0, 0, 130), (200, 80, 32, 96, 4, 64, 200),
                                              (64, 100, 64, 128, 0, 0, 64)):
        q = torch.randint(0, 16 - shift, (n, k), dtype=torch.uint8, generator=g)
        ng = -(-k // group)
        scales = (torch.rand(n, ng, generator=g) * 0.1 + 1e-3).to(torch.float16)
        zeros = torch.randint(0, 16 - shift, (n, ng), dtype=torch.uint8, generator=g)
        codes = torch.nn.functional.pad(q + shift, (0, k_pad - k, 0, kernels.pad_to(n, kernels.N_BLOCK) - n))
        packed = kernels.pack_int4(codes)
        zf = zeros.float().repeat_interleave(group, 1)[:, :k]
        sf = scales.float().repeat_interleave(group, 1)[:, :k]
        ref = ((q.float() - zf) * sf).to(torch.bfloat16)[n0:n1].t()
        got = dequant_t(packed, scales.view(torch.int16).contiguous(), zeros, k, k_pad, n0, n1, group, shift)
        if not torch.equal(got, ref):
            return False
    return True


@functools.cache
def int4_dequantizer() -> Dequantizer | None:
    """The C dequantizer, or None (the reason is in `native.reason`)."""
    global reason
    if os.environ.get("EDGELLM_NATIVE", "1") == "0":
        reason = "EDGELLM_NATIVE=0"
        return None
    if not (kernels.int4_available() and kernels.int4_layout_ok()):
        reason = "this torch has no usable packed int4 layout"
        return None
    cc = _compiler()
    if cc is None:
        reason = "no C compiler (cc, gcc, clang or $CC) on PATH"
        return None
    try:
        lib = ctypes.CDLL(str(_build(cc)))
        fn = lib.edgellm_dequant_int4_t
        fn.restype = None
        fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 8 + [ctypes.c_int]
        dequant_t = _wrap(fn)
        if not _self_check(dequant_t):
            reason = "the compiled int4 dequantizer disagreed with the reference"
            return None
    except (OSError, RuntimeError, AttributeError) as e:
        reason = f"building the int4 dequantizer failed: {e}"
        return None
    reason = ""
    return dequant_t
