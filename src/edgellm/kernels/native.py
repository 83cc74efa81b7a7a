"""Our C kernels (`csrc/`), built on first use and called through ctypes, each with a torch fallback:

- `dequant_int4.c`: torch's packed int4 layout -> transposed bf16 weight, for int4 prefill (quant/linear.py).
- `attention_bf16.c`: causal attention for bf16 prefill with AVX512-BF16 dot products (model.py).
- `attention_f32.c`: the same for fp32 prefill with AVX2 + FMA (CPUs without native bf16).
- `decode_attention.c`: one decode step of attention for sequences in rows of a pooled cache (serve/engine.py),
  and attention over a whole static cache for the compiled decode/verify steps (its torch operator:
  `decode_attention_op.cpp`, kernels/cache_attention.py).
- `pointwise.c`: RMSNorm and SiLU(gate) * up in one pass each, for eager (prefill) forwards (model.py).
- `decode_step.c`: a whole decode/verify step of a block-quantized model, calling the kernels above (native_step.py).

Each is compiled with the system C compiler (`$CC`, else cc/gcc/clang; `-O3 -march=native -fopenmp`, ~0.3 s),
cached in `~/.cache/edgellm/native/` under a hash of the source, compiler, flags and CPU, and checked against
a torch reference before it is used. Without a compiler, or if any of that fails, the accessor returns None
(the reason is in `reasons[name]`) and callers keep the torch path. `EDGELLM_NATIVE=0` turns all off.
(qmatmul.c, the int8-activation kernel, and decode_attention.c are built with their torch operators by
`load_torch_op`: kernels/blockq.py, kernels/cache_attention.py.)
Their OpenMP threads are torch's: the libraries link `libgomp.so.1`, which torch has already loaded.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch

from . import cpu

CSRC = Path(__file__).with_name("csrc")
FLAG_SETS = (["-O3", "-march=native", "-fopenmp"], ["-O3", "-march=native"], ["-O3"])
BASELINE_KERNELS = {"qmatmul", "attention_f32", "decode_attention", "decode_step"}
# decode_step.c and pointwise.c round like eager torch: a product and a sum are never fused into one FMA (RoPE is
# bit-identical to model.apply_rope). pointwise.c: without AVX-512's masks, gcc vectorizes the clamps and selects
# of exp/SiLU only when comparisons may not trap (the values are the same; an AVX2 build of the SiLU pass was
# scalar and 14x slower)
EXTRA_FLAGS = {"decode_step": ["-ffp-contract=off"], "pointwise": ["-fno-trapping-math", "-ffp-contract=off"]}
# why a kernel is off, by name ("" once it is on)
reasons: dict[str, str] = {}

Dequantizer = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int, int, int, int, int, int], torch.Tensor]


def status() -> str:
    """One line on the kernels this process tried: "C kernels: attention_bf16 on, dequant_int4 off (...)"."""
    if not reasons:
        return ""
    parts = [f"{name} {'on' if not why else f'off ({why})'}" for name, why in sorted(reasons.items())]
    return "C kernels: " + ", ".join(parts)


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def cache_root() -> Path:
    """edgellm's cache folder ($EDGELLM_CACHE, else ~/.cache/edgellm): C kernels, compiled decode steps."""
    return Path(os.environ.get("EDGELLM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "edgellm"))


def notice(message: str) -> None:
    """One line on stderr before a wait the user did not ask for (first-run builds and compiles)."""
    print(f"edgellm: {message}", file=sys.stderr, flush=True)


def _flag_sets(name: str) -> tuple[list[str], ...]:
    """-march=native, except for kernels that pick their instruction set at run time (the x86-64-v3 baseline:
    AVX2/FMA/F16C, VNNI variants by target attribute) and under EDGELLM_ISA, which must not let the compiler
    emit AVX-512 the forced path is meant to avoid (a cap at an AVX-512 level keeps -march=native: the AVX-512
    kernels are what that path runs)."""
    extra = EXTRA_FLAGS.get(name, [])
    cap = cpu.forced()
    if name in BASELINE_KERNELS or (cap is not None and cpu.LEVELS.index(cap) < cpu.LEVELS.index("avx512_vnni")):
        return (["-O3", "-march=x86-64-v3", "-fopenmp", *extra], ["-O3", "-march=x86-64-v3", *extra])
    return tuple([*flags, *extra] for flags in FLAG_SETS)


def _build(cc: str, name: str) -> Path:
    """Compile (or reuse) csrc/<name>.c as a shared library; raises RuntimeError on failure."""
    source = CSRC / f"{name}.c"
    src = source.read_bytes()
    cc_id = f"{cc}:{os.stat(cc).st_mtime_ns}"
    errors = []
    for flags in _flag_sets(name):
        key = hashlib.sha256(src + f"|{cc_id}|{flags}|{cpu.cpu_flags()}".encode()).hexdigest()[:24]
        lib = cache_root() / "native" / f"{name}-{key}.so"
        if lib.exists():
            return lib
        lib.parent.mkdir(parents=True, exist_ok=True)
        notice(f"building the {name} C kernel for this CPU (once per machine, ~1 s)")
        with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
            tmp_lib = Path(tmp) / lib.name
            error = _run([cc, *flags, "-shared", "-fPIC", "-o", str(tmp_lib), str(source), "-lm"])
            if error is None:
                os.replace(tmp_lib, lib)  # atomic: a concurrent process sees a whole file or none
                return lib
            errors.append(f"{cc} {' '.join(flags)}: {error}")
    raise RuntimeError("; ".join(errors))


def _run(cmd: list[str]) -> str | None:
    """Run a compiler command: None on success, else the last line it printed (or its exit status)."""
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode == 0:
        return None
    return (r.stderr.strip().splitlines()[-1:] or [f"exit status {r.returncode}"])[0]


def _build_torch_op(cc: str, name: str) -> Path:
    """csrc/<name>.c plus its torch-op wrapper csrc/<name>_op.cpp (torch's stable C ABI: light headers, ~2 s
    to build) as one shared library: the C functions for ctypes, and a torch operator that compiled code calls
    without going through Python. Raises RuntimeError when that cannot be built (no C++ compiler, no headers)."""
    cxx = os.environ.get("CXX") or "c++"
    cxx = shutil.which(cxx) or shutil.which("g++")
    torch_dir = Path(torch.__file__).parent
    if cxx is None or not (torch_dir / "include" / "torch" / "csrc" / "stable" / "library.h").is_file():
        raise RuntimeError("no C++ compiler or no torch stable-ABI headers")
    c_src, op_src = CSRC / f"{name}.c", CSRC / f"{name}_op.cpp"
    flags = _flag_sets(name)[0]
    key = hashlib.sha256(c_src.read_bytes() + op_src.read_bytes() + f"|{cc}|{cxx}|{flags}|{torch.__version__}|"
                         f"{cpu.cpu_flags()}".encode()).hexdigest()[:24]
    lib = cache_root() / "native" / f"{name}_op-{key}.so"
    if lib.exists():
        return lib
    lib.parent.mkdir(parents=True, exist_ok=True)
    notice(f"building the {name} C kernel and its torch operator for this CPU (once per machine, a few seconds)")
    with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
        obj, tmp_lib = Path(tmp) / f"{name}.o", Path(tmp) / lib.name
        for cmd in ([cc, *flags, "-fPIC", "-c", str(c_src), "-o", str(obj)],
                    [cxx, "-std=c++17", "-O2", "-fPIC", "-shared", f"-I{torch_dir / 'include'}", str(op_src),
                     str(obj), "-o", str(tmp_lib), "-fopenmp", f"-L{torch_dir / 'lib'}", "-ltorch_cpu", "-lc10",
                     f"-Wl,-rpath,{torch_dir / 'lib'}"]):
            error = _run(cmd)
            if error is not None:
                raise RuntimeError(f"{Path(cmd[0]).name}: {error}")
        os.replace(tmp_lib, lib)
    return lib


def load_torch_op(name: str) -> tuple[ctypes.CDLL, bool] | None:
    """The library of csrc/<name>.c, with its torch operator registered when that could be built:
    (library, True); else the plain C library (library, False); None with `reasons[name]` set."""
    if os.environ.get("EDGELLM_NATIVE", "1") == "0":
        reasons[name] = "EDGELLM_NATIVE=0"
        return None
    cc = _compiler()
    if cc is not None:
        try:
            path = _build_torch_op(cc, name)
            torch.ops.load_library(str(path))
            return ctypes.CDLL(str(path)), True
        except (OSError, RuntimeError) as e:
            reasons[f"{name}_op"] = f"torch operator not built ({e}); calling through Python"
    lib = _load(name)
    return None if lib is None else (lib, False)


def _load(name: str) -> ctypes.CDLL | None:
    """The built library, or None with `reasons[name]` set."""
    if os.environ.get("EDGELLM_NATIVE", "1") == "0":
        reasons[name] = "EDGELLM_NATIVE=0"
        return None
    cc = _compiler()
    if cc is None:
        reasons[name] = "no C compiler (cc, gcc, clang or $CC) on PATH"
        return None
    try:
        return ctypes.CDLL(str(_build(cc, name)))
    except (OSError, RuntimeError) as e:
        reasons[name] = f"building {name} failed: {e}"
        return None


def _functions(name: str, *symbols: str) -> list | None:
    """These functions of the built library, or None with `reasons[name]` set."""
    lib = _load(name)
    if lib is None:
        return None
    try:
        return [getattr(lib, symbol) for symbol in symbols]
    except AttributeError as e:
        reasons[name] = f"building {name} failed: {e}"
        return None


def _verified(name: str, kernel: Callable, check: Callable[[Callable], bool]) -> Callable | None:
    """`kernel` if it passes its check against torch, else None with `reasons[name]` set."""
    if not check(kernel):
        reasons[name] = f"the compiled {name} kernel disagreed with the reference"
        return None
    reasons[name] = ""
    return kernel


def _wrap(fn: ctypes._CFuncPtr) -> Dequantizer:
    from . import torch_lowbit as kernels

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
    from . import torch_lowbit as kernels

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
    """The C dequantizer, or None (the reason is in `reasons["dequant_int4"]`)."""
    from . import torch_lowbit as kernels

    name = "dequant_int4"
    if not (kernels.int4_available() and kernels.int4_layout_ok()):
        reasons[name] = "this torch has no usable packed int4 layout"
        return None
    fns = _functions(name, "edgellm_dequant_int4_t")
    if fns is None:
        return None
    fn = fns[0]
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 8 + [ctypes.c_int]
    return _verified(name, _wrap(fn), _self_check)


Attention = Callable[..., "torch.Tensor | None"]
ATTENTION_HEAD_DIM = 64


def _wrap_attention(fn: ctypes._CFuncPtr, dtype: torch.dtype) -> Attention:
    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int,
               segments: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor | None:
        """Causal attention of q (B, H, T, 64) at positions start.. over k, v (B, Hkv, >= start+T, 64) whose
        slot j holds position j, all `dtype` with unit stride along the head dim (any other strides) ->
        (B, T, H, 64) contiguous. segments = (lo (B, T), shared (B,)), int64: packed rows, where query t of row b
        also skips keys shared[b] <= j < lo[b, t]. None if the kernel declined (shape, or out of memory)."""
        B, H, T, D = q.shape
        Hkv = k.shape[1]
        if (D != ATTENTION_HEAD_DIM or H % Hkv or k.shape[2] < start + T or v.shape[:3] != k.shape[:3]
                or any(t.dtype != dtype or t.stride(-1) != 1 for t in (q, k, v))):
            return None
        lo = shared = None
        if segments is not None:
            lo, shared = (t.to(torch.int64).contiguous() for t in segments)
            if lo.shape != (B, T) or shared.shape != (B,):
                return None
        out = torch.empty(B, T, H, D, dtype=dtype)
        rc = fn(q.data_ptr(), *q.stride()[:3], k.data_ptr(), *k.stride()[:3], v.data_ptr(), *v.stride()[:3],
                out.data_ptr(), B, H, Hkv, T, start, D, D ** -0.5, None if lo is None else lo.data_ptr(),
                None if shared is None else shared.data_ptr(), torch.get_num_threads())
        return out if rc == 0 else None

    return attend


def segment_mask(T: int, start: int, segments: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """The keys each query sees, (T, start + T) causal, or (B, 1, T, T) for packed rows (start 0; see attend)."""
    L = start + T
    causal = torch.arange(L)[None, :] <= torch.arange(start, L)[:, None]            # (T, L)
    if segments is None:
        return causal
    lo, shared = segments
    j = torch.arange(L)
    hole = (j[None, None, :] >= shared[:, None, None]) & (j[None, None, :] < lo[:, :, None])  # (B, T, L)
    return (causal[None] & ~hole)[:, None]


def _attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int,
                         segments: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    L = start + q.shape[2]
    y = torch.nn.functional.scaled_dot_product_attention(q.float(), k[:, :, :L].float(), v[:, :, :L].float(),
                                                         attn_mask=segment_mask(q.shape[2], start, segments),
                                                         enable_gqa=True)
    return y.transpose(1, 2)


def _attention_self_check(attend: Attention, dtype: torch.dtype) -> bool:
    """Against fp32 SDPA: strided q, a longer cache, a cached prefix, GQA and plain heads, odd lengths."""
    g = torch.Generator().manual_seed(4)
    tol = 0.03 if dtype == torch.bfloat16 else 1e-4
    for B, H, Hkv, T, start in ((1, 6, 2, 37, 0), (2, 4, 4, 21, 11)):
        q = torch.randn(B, T, H, 64, generator=g).to(dtype).transpose(1, 2)
        k, v = torch.randn(2, B, Hkv, start + T + 3, 64, generator=g).to(dtype)
        got = attend(q, k, v, start)
        if got is None or (got.float() - _attention_reference(q, k, v, start)).abs().max().item() > tol:
            return False
    # packed rows: a 5-token shared prefix, then segments of 7, 9 and 13 tokens (row 1: one segment of 29)
    q = torch.randn(2, 34, 4, 64, generator=g).to(dtype).transpose(1, 2)
    k, v = torch.randn(2, 2, 2, 34, 64, generator=g).to(dtype)
    lo = torch.tensor([[0] * 5 + [5] * 7 + [12] * 9 + [21] * 13, [0] * 34])
    shared = torch.tensor([5, 0])
    got = attend(q, k, v, 0, (lo, shared))
    return got is not None and (got.float() - _attention_reference(q, k, v, 0, (lo, shared))).abs().max().item() <= tol


def _attention_kernel(name: str, level: str, dtype: torch.dtype) -> Attention | None:
    fns = _functions(name, "edgellm_attention_available", f"edgellm_{name}")
    if fns is None:
        return None
    available, fn = fns
    if available() != 1 or not cpu.has(level):
        reasons[name] = f"this CPU or compiler has no {level.upper().replace('_', '-')}"
        return None
    fn.restype = ctypes.c_int
    fn.argtypes = ([ctypes.c_void_p] + [ctypes.c_int64] * 3) * 3 + [ctypes.c_void_p] + [ctypes.c_int64] * 6 + \
        [ctypes.c_float, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
    return _verified(name, _wrap_attention(fn, dtype), functools.partial(_attention_self_check, dtype=dtype))


@functools.cache
def attention_bf16() -> Attention | None:
    """The bf16 C attention kernel (AVX512-BF16), or None (the reason is in `reasons["attention_bf16"]`)."""
    return _attention_kernel("attention_bf16", "avx512_bf16", torch.bfloat16)


@functools.cache
def attention_f32() -> Attention | None:
    """The fp32 C attention kernel (AVX2 + FMA), or None (the reason is in `reasons["attention_f32"]`)."""
    return _attention_kernel("attention_f32", "avx2", torch.float32)


DecodeAttention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, list[int], list[int], list[int]],
                           torch.Tensor | None]


def _wrap_decode_attention(fn: ctypes._CFuncPtr) -> DecodeAttention:
    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: list[int], lo: list[int],
               hi: list[int]) -> torch.Tensor | None:
        """q (B, H, D) of sequence b in cache row rows[b] attending to its keys lo[b]..hi[b] of k, v (P, Hkv, S, D),
        all contiguous fp32 or bf16 -> (B, H, D). None if the kernel declined."""
        if (q.dtype not in (torch.float32, torch.bfloat16) or any(t.dtype != q.dtype or not t.is_contiguous()
                                                                   for t in (q, k, v)) or k.shape != v.shape
                or any(not 0 <= r < k.shape[0] for r in rows)):
            return None
        B, H, D = q.shape
        out = torch.empty_like(q)
        idx = (ctypes.c_int64 * (3 * B))(*rows, *lo, *hi)
        base = ctypes.addressof(idx)
        rc = fn(int(q.dtype == torch.bfloat16), q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(),
                base, base + 8 * B, base + 16 * B, B, H, k.shape[1], k.shape[2], D, D ** -0.5,
                torch.get_num_threads())
        return out if rc == 0 else None

    return attend


def _decode_attention_reference(q, k, v, rows, lo, hi) -> torch.Tensor:
    outs = []
    for b, (r, a, z) in enumerate(zip(rows, lo, hi, strict=True)):
        kk, vv = k[r, :, a:z + 1].float(), v[r, :, a:z + 1].float()  # (Hkv, L, D)
        outs.append(torch.nn.functional.scaled_dot_product_attention(q[b, :, None].float(), kk, vv,
                                                                     enable_gqa=True)[:, 0])
    return torch.stack(outs)


def _decode_attention_self_check(attend: DecodeAttention) -> bool:
    """Against fp32 SDPA: both dtypes, GQA, rows out of order, windows (lo > 0), one key; and a row's result must
    not depend on the rows batched with it."""
    g = torch.Generator().manual_seed(5)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 0.02)):
        k, v = torch.randn(2, 4, 2, 40, 64, generator=g).to(dtype)
        q = torch.randn(3, 6, 64, generator=g).to(dtype)
        rows, lo, hi = [3, 0, 2], [0, 5, 0], [39, 20, 0]
        got = attend(q, k, v, rows, lo, hi)
        if got is None or (got.float() - _decode_attention_reference(q, k, v, rows, lo, hi)).abs().max() > tol:
            return False
        alone = attend(q[1:2].contiguous(), k, v, rows[1:2], lo[1:2], hi[1:2])
        if alone is None or not torch.equal(alone[0], got[1]):
            return False
    return True


@functools.cache
def decode_attention_library() -> tuple[ctypes.CDLL, bool] | None:
    """csrc/decode_attention.c with its torch operator (kernels/cache_attention.py), as `load_torch_op` gives it;
    its AVX-512 loops switched on where this CPU has them and EDGELLM_ISA allows them (every entry point of the
    library, ctypes and operator alike, then takes the same loops)."""
    loaded = load_torch_op("decode_attention")
    if loaded is not None:
        loaded[0].edgellm_attention_use_avx512(ctypes.c_int(int(cpu.has("avx512_vnni"))))
    return loaded


@functools.cache
def decode_attention() -> DecodeAttention | None:
    """The batched decode-attention kernel, or None (the reason is in `reasons["decode_attention"]`)."""
    loaded = decode_attention_library()
    fn = None if loaded is None else getattr(loaded[0], "edgellm_decode_attention", None)
    if fn is None:
        reasons.setdefault("decode_attention", "building decode_attention failed")
        return None
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_int] + [ctypes.c_void_p] * 7 + [ctypes.c_int64] * 5 + [ctypes.c_float, ctypes.c_int]
    return _verified("decode_attention", _wrap_decode_attention(fn), _decode_attention_self_check)


class Pointwise(NamedTuple):
    """`rmsnorm(x, weight, eps)` and `silu_mul(gate_up)`: (..., C) / (..., 2I) -> (..., C) / (..., I), or None
    when the kernel declines (dtype, layout); `rope_(qkv, heads, head_dim, cos, sin)`: RoPE in place on the first
    `heads` heads of each row of qkv (B, T, >= heads * head_dim) with cos/sin (T, D) per position or (B * T, D) per
    token, True, or False when it declines. See csrc/pointwise.c."""
    rmsnorm: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor | None]
    silu_mul: Callable[[torch.Tensor], torch.Tensor | None]
    rope_: Callable[[torch.Tensor, int, int, torch.Tensor, torch.Tensor], bool]


def _wrap_pointwise(rms_fn: ctypes._CFuncPtr, silu_fn: ctypes._CFuncPtr, rope_fn: ctypes._CFuncPtr) -> Pointwise:
    def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
        C = x.shape[-1]
        if (x.dtype not in (torch.float32, torch.bfloat16) or weight.dtype != x.dtype or weight.shape != (C,)
                or not (x.is_contiguous() and weight.is_contiguous())):
            return None
        out = torch.empty_like(x)
        rms_fn(int(x.dtype == torch.bfloat16), x.data_ptr(), weight.data_ptr(), out.data_ptr(), x.numel() // C, C,
               eps, torch.get_num_threads())
        return out

    def silu_mul(gate_up: torch.Tensor) -> torch.Tensor | None:
        two_i = gate_up.shape[-1]
        if gate_up.dtype not in (torch.float32, torch.bfloat16) or two_i % 2 or not gate_up.is_contiguous():
            return None
        out = gate_up.new_empty(*gate_up.shape[:-1], two_i // 2)
        silu_fn(int(gate_up.dtype == torch.bfloat16), gate_up.data_ptr(), out.data_ptr(), gate_up.numel() // two_i,
                two_i // 2, torch.get_num_threads())
        return out

    def rope_(qkv: torch.Tensor, heads: int, head_dim: int, cos: torch.Tensor, sin: torch.Tensor) -> bool:
        B, T, W = qkv.shape
        rows = cos.shape[0]  # T: one table row per position of every sequence; B * T: a row per token
        if (qkv.dtype not in (torch.float32, torch.bfloat16) or head_dim % 2 or heads * head_dim > W
                or qkv.stride(2) != 1 or qkv.stride(0) != T * qkv.stride(1) or rows not in (T, B * T)
                or cos.shape != (rows, head_dim) or sin.shape != (rows, head_dim)
                or cos.dtype != qkv.dtype or sin.dtype != qkv.dtype
                or not (cos.is_contiguous() and sin.is_contiguous())):
            return False
        rope_fn(int(qkv.dtype == torch.bfloat16), qkv.data_ptr(), B * T, rows, heads, qkv.stride(1), head_dim,
                cos.data_ptr(), sin.data_ptr(), torch.get_num_threads())
        return True

    return Pointwise(rmsnorm, silu_mul, rope_)


def _pointwise_self_check(kernels: Pointwise) -> bool:
    """Against torch's eager formulas (model.py): fp32 within 1e-5 relative; bf16 within one rounding step, and
    almost every element bit-equal (only sums/exp that land next to a rounding boundary may differ)."""
    g = torch.Generator().manual_seed(6)
    for dtype in (torch.float32, torch.bfloat16):
        x = (torch.randn(5, 96, generator=g) * 3).to(dtype)
        w = (torch.rand(96, generator=g) + 0.5).to(dtype)
        x32 = x.float()
        ref_norm = w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype)
        gu = (torch.randn(5, 2 * 80, generator=g) * 4).to(dtype)
        gu[0, :4] = torch.tensor([-200.0, 200.0, 0.0, -90.0])  # exp's clamps
        gate, up = gu.chunk(2, dim=-1)
        ref_act = torch.nn.functional.silu(gate) * up
        for got, ref in ((kernels.rmsnorm(x, w, 1e-5), ref_norm), (kernels.silu_mul(gu), ref_act)):
            if got is None or got.shape != ref.shape or got.dtype != dtype:
                return False
            if not torch.allclose(got.float(), ref.float(), rtol=1e-5 if dtype == torch.float32 else 2 ** -7,
                                  atol=1e-6):
                return False
            if dtype == torch.bfloat16 and (got != ref).float().mean() > 0.02:
                return False
        # RoPE: bit-identical to model.apply_rope, on a fused (B, T, q | k | v) projection, v untouched
        qkv = (torch.randn(2, 3, 5 * 16, generator=g) * 3).to(dtype)
        cos, sin = (torch.randn(3, 16, generator=g).to(dtype) for _ in range(2))
        qk = qkv[..., :4 * 16].view(2, 3, 4, 16)
        ref_qk = qk * cos[:, None] + torch.cat((qk[..., 8:], qk[..., :8]), -1) * sin[:, None]
        got = qkv.clone()
        if not kernels.rope_(got, 4, 16, cos, sin):
            return False
        if not (torch.equal(got[..., :4 * 16].view(2, 3, 4, 16), ref_qk) and torch.equal(got[..., 64:], qkv[..., 64:])):
            return False
    return True


@functools.cache
def pointwise() -> Pointwise | None:
    """The fused RMSNorm / SiLU-gate kernels, or None (the reason is in `reasons["pointwise"]`)."""
    fns = _functions("pointwise", "edgellm_rmsnorm", "edgellm_silu_mul", "edgellm_rope")
    if fns is None:
        return None
    rms_fn, silu_fn, rope_fn = fns
    rms_fn.restype = silu_fn.restype = rope_fn.restype = None
    rope_fn.argtypes = ([ctypes.c_int, ctypes.c_void_p] + [ctypes.c_int64] * 5 + [ctypes.c_void_p] * 2
                        + [ctypes.c_int])
    rms_fn.argtypes = [ctypes.c_int] + [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 2 + [ctypes.c_float, ctypes.c_int]
    silu_fn.argtypes = [ctypes.c_int] + [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 2 + [ctypes.c_int]
    return _verified("pointwise", _wrap_pointwise(rms_fn, silu_fn, rope_fn), _pointwise_self_check)
