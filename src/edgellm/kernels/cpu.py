"""What this CPU can do, and which path each operation takes on it: the one place that knows.

Detection reads the `flags` line of /proc/cpuinfo (Linux; elsewhere torch's own capability probe). The
instruction sets we care about, best first:

    amx            AMX tiles (bf16/int8)               Sapphire Rapids and later Xeons
    avx512_bf16    AVX-512 with bf16 dot products      Zen 4/5, Cooper Lake, Sapphire Rapids
    avx512_vnni    AVX-512 with int8 dot products      Cascade Lake, Ice Lake
    avx_vnni       AVX2 + VEX int8 dot products        Intel Core 12th gen+ / Core Ultra laptops
    avx2           AVX2 + FMA + F16C                   every x86-64 laptop since ~2013 (AMD Zen 2/3 too)
    neon           ARM (detected and reported; our C kernels are x86-only today, ARM takes torch paths)

`EDGELLM_ISA=avx2` (or `avx_vnni`, `avx512_vnni`, ...) caps what edgellm uses to that level: our kernels take
their AVX2 variants and bf16 counts as not native. With torch's own switches a machine with AVX-512
reproduces an AVX2 laptop:

    EDGELLM_ISA=avx2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 edgellm bench ...
"""

from __future__ import annotations

import functools
import os
import platform
from pathlib import Path

LEVELS = ("none", "avx2", "avx_vnni", "avx512_vnni", "avx512_bf16", "amx")
# /proc/cpuinfo flags each level needs (all of them, on top of the previous level's)
_NEEDS = {
    "avx2": {"avx2", "fma", "f16c"},
    "avx_vnni": {"avx_vnni"},
    "avx512_vnni": {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"},
    "avx512_bf16": {"avx512_bf16"},
    "amx": {"amx_tile", "amx_bf16", "amx_int8"},
}


def cpu_flags() -> str:
    """The `flags` line of /proc/cpuinfo ("" elsewhere): what -march=native and SIMD probes depend on."""
    try:
        return next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")), "")
    except OSError:
        return ""


def cpu_name() -> str:
    try:
        for ln in Path("/proc/cpuinfo").read_text().splitlines():
            if ln.startswith("model name"):
                return ln.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.cache
def detected() -> frozenset[str]:
    """The instruction-set names of `LEVELS` (and "neon") this CPU has, ignoring EDGELLM_ISA."""
    flags = set(cpu_flags().split()[1:])
    if not flags:  # not Linux: ask torch (its names: "AVX2", "AVX512", "DEFAULT", ...)
        import torch

        cap = torch.backends.cpu.get_cpu_capability().lower()
        flags = {"avx2", "fma", "f16c"} if cap.startswith("avx") else set()
        if cap == "avx512":
            flags |= _NEEDS["avx512_vnni"]
    have = set()
    if platform.machine().lower() in ("aarch64", "arm64"):
        have.add("neon")
    # avx_vnni and the AVX-512 levels each build on avx2, but not on each other (Zen 4 lacks avx_vnni)
    if _NEEDS["avx2"] <= flags:
        have.add("avx2")
        for level in ("avx_vnni", "avx512_vnni"):
            if _NEEDS[level] <= flags:
                have.add(level)
        if "avx512_vnni" in have and "avx512_bf16" in flags:
            have.add("avx512_bf16")
        if "avx512_bf16" in have and _NEEDS["amx"] <= flags:
            have.add("amx")
    return frozenset(have)


def forced() -> str | None:
    """The EDGELLM_ISA cap ("avx2", ...) or None; an unknown value is an error naming the choices."""
    value = os.environ.get("EDGELLM_ISA", "").strip().lower()
    if not value or value == "native":
        return None
    if value not in LEVELS:
        raise ValueError(f"EDGELLM_ISA={value!r} is not one of: native, {', '.join(LEVELS)}")
    return value


def has(level: str) -> bool:
    """True if edgellm may use `level` here: the CPU has it and EDGELLM_ISA does not cap it away."""
    cap = forced()
    if cap is not None and LEVELS.index(level) > LEVELS.index(cap):
        return False
    return level in detected()


def native_bf16() -> bool:
    """Does this CPU multiply bf16 in hardware? Without it torch's bf16 GEMMs fall back to a slow kernel."""
    return has("avx512_bf16")


def best() -> str:
    """The best level in use ("none" on CPUs without AVX2)."""
    return next((lvl for lvl in reversed(LEVELS) if lvl != "none" and has(lvl)), "none")


def int8_dot_isa() -> int | None:
    """Which variant of csrc/qmatmul.c runs: 2 AVX512-VNNI, 1 AVX-VNNI, 0 AVX2, None (no AVX2: torch path)."""
    if has("avx512_vnni"):
        return 2
    if has("avx_vnni"):
        return 1
    return 0 if has("avx2") else None


def auto_dtype() -> str:
    """The activation dtype `--dtype auto` picks: bf16 where the CPU computes it natively, else fp32."""
    return "bf16" if native_bf16() else "fp32"


def summary() -> str:
    """One line for tables and `edgellm info`: the CPU, what it has, what edgellm uses."""
    have = [lvl for lvl in LEVELS[1:] if lvl in detected()] + (["neon"] if "neon" in detected() else [])
    cap = forced()
    used = best()
    text = f"{cpu_name()} ({os.cpu_count()} threads): {' '.join(have) or 'no AVX2'}; path {used}"
    return text + (f" (forced by EDGELLM_ISA={cap})" if cap else "")


def paths(dtype: str | None = None) -> dict[str, str]:
    """Which implementation each operation takes on this CPU (for `edgellm info` and bench notes)."""
    act = dtype or auto_dtype()
    isa = int8_dot_isa()
    kernel = {2: "AVX512-VNNI", 1: "AVX-VNNI", 0: "AVX2 maddubs"}.get(isa)  # None: no C kernel here
    dot = f"C int8 dot, {kernel}" if kernel else "torch (dequantize + matmul)"
    dense = f"dequantize a block of rows to {act}, then torch's {act} GEMM"
    prefill = (f"the int8 kernel for short inputs, else {dense} (AMX)" if isa == 2 and has("amx") else
               f"the int8 kernel, {kernel} (activations quantized to int8 per 32)" if kernel else dense)
    return {
        "activations": f"{act} ({'native bf16' if native_bf16() else 'no native bf16: fp32'} by --dtype auto)",
        "4/8-bit decode": dot + " (activations quantized to int8 per 32)",
        "4/8-bit prefill": prefill,
        "decode step": "one C call per token (no compile) for block-quantized weights, else torch.compile",
        "prefill attention": ("C kernel, AVX512-BF16" if native_bf16() and act == "bf16" else
                              "C kernel, AVX2 fp32" if has("avx2") and act == "fp32" else f"torch ({act})"),
    }
