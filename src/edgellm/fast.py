"""The compiled decode step: torch.compile of `Transformer.decode_step`, saved on disk across processes (and
`Transformer.verify_step`, the same step for the 2/4/8/17 tokens speculative decoding verifies at once).

Why: at this model size a decode step is ~100 tiny ops and eager PyTorch spends most of its time in
Python/dispatcher overhead. Inductor fuses the step into a few C++ kernels (cpp_wrapper removes the
remaining Python). Shapes are static (a KV cache of a fixed bucket size and a (1,) position tensor), so
each cache bucket compiles once.

Each compiled step is an ahead-of-time artifact (`torch.compile(...).aot_compile`, saved with
`save_compiled_function`): a later process loads it without re-tracing the model with dynamo (~2 s of the
~4 s a cached torch.compile still costs). Dynamo's tensor guards are left out of the artifact (they cannot
be checked reliably across inference mode); instead the file name is a fingerprint of everything the traced
code depends on: torch and Python versions, the source of the modules it runs, the config, every parameter
and buffer's name/shape/stride/dtype, every module's plain attributes, and the (batch, cache slots, dtype)
shape. If the AOT path fails, the step falls back to a regular torch.compile (FX-graph cached). Saved steps
unused for 30 days are deleted whenever a new one is saved.

Models whose linears all keep block-quantized weights (the shipped GGUF model) compile nothing: their steps run
as one C call each (native_step.py), ~10-15 % faster than the compiled step and without inductor in memory.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
import os
import shutil
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path

import torch

from .kernels import cache_attention
from .kernels.cpu import cpu_flags
from .kernels.native import cache_root, notice
from .model import Transformer
from .native_step import NativeStep

CACHE_BUCKET = 256  # KV-cache lengths are rounded up to a multiple of this, so few shapes get compiled
# (the compiled step attends over the whole bucket: 256 vs 512 is ~6% faster decode on the default model)


def cache_dir() -> Path:
    """Inductor's own cache (FX graphs, C++ builds)."""
    return cache_root() / "inductor"


def steps_dir() -> Path:
    """The saved AOT-compiled decode steps, one file per fingerprint."""
    return cache_root() / "steps"


def compiler_available() -> str | None:
    """None if a C++ compiler inductor can use is present, else the reason it is not."""
    cxx = os.environ.get("CXX") or "g++"
    if shutil.which(cxx) is None and shutil.which("c++") is None:
        return f"no C++ compiler ({cxx}) on PATH"
    return None


@functools.cache
def _source_hash() -> str:
    """The source of the modules the decode step runs, read once (as this process runs them)."""
    from . import lora
    from .kernels import blocklinear, blockq
    from .kernels import torch_lowbit as kernels
    from .quant import linear

    h = hashlib.sha256()
    for mod in (sys.modules[Transformer.__module__], linear, kernels, blocklinear, blockq, cache_attention, lora,
                sys.modules[__name__]):
        h.update(Path(mod.__file__).read_bytes())
    return h.hexdigest()


def step_fingerprint(model: Transformer, key: tuple) -> str:
    """Everything the traced decode step depends on (see the module docstring), hashed."""
    h = hashlib.sha256()
    h.update(f"{torch.__version__}|{sys.version}|{_source_hash()}|{key}|{model.config!r}".encode())
    for name, t in itertools.chain(model.named_parameters(), model.named_buffers()):
        h.update(f"{name}:{tuple(t.shape)}:{t.stride()}:{t.dtype}".encode())
    for name, m in model.named_modules():
        plain = {k: v for k, v in vars(m).items() if isinstance(v, int | float | str | bool | type(None))}
        # tensors kept as plain attributes (the RoPE tables, an input scale): their layout is traced too
        plain |= {k: (tuple(v.shape), v.stride(), v.dtype) for k, v in vars(m).items() if isinstance(v, torch.Tensor)}
        h.update(f"{name}:{type(m).__qualname__}:{sorted(plain.items(), key=str)}".encode())
    return h.hexdigest()[:32]


STEP_MAX_AGE_DAYS = 30  # saved steps not used for this long are deleted when a new one is saved


def prune_steps(max_age_days: float = STEP_MAX_AGE_DAYS) -> None:
    """Delete saved steps unused for `max_age_days` (every source edit or torch upgrade makes new ones)."""
    cutoff = time.time() - max_age_days * 86400
    for f in steps_dir().glob("decode-*.bin"):
        try:
            if f.stat().st_mtime < cutoff:
                f.unlink()
        except OSError:  # another process got there first, or a read-only cache
            pass


def _machine_id() -> str:
    """What inductor's SIMD probe result depends on: the CPU, the compiler, torch."""
    cxx = shutil.which(os.environ.get("CXX") or "g++") or shutil.which("c++") or ""
    return hashlib.sha256(f"{torch.__version__}|{cxx}|{cpu_flags()}".encode()).hexdigest()


def _isa_marker() -> Path:
    return steps_dir() / "simd-probe-ok"


def _decode(model: Transformer, token: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    return model.decode_step(token, pos)


def _verify(model: Transformer, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    return model.verify_step(tokens, pos)


VERIFY_SIZES = (2, 4, 8, 17)  # speculative verification compiles for these token counts; shorter drafts are padded


def _serializable_guards(entries: list) -> list[bool]:
    """Keep only guards an AOT artifact can hold and that stay valid across processes (no tensor matches:
    the fingerprint covers shapes and dtypes)."""
    from torch._dynamo.guards import CheckFunctionManager

    drop = set(CheckFunctionManager.UNSUPPORTED_SERIALIZATION_GUARD_TYPES) | {"TENSOR_MATCH"}
    return [not (e.is_global or e.guard_type in drop) for e in entries]


def bucket(length: int) -> int:
    return -(-length // CACHE_BUCKET) * CACHE_BUCKET


class CompiledDecoder:
    """Wraps one model's decode step; `self.step(token (B,1), pos (1,)) -> logits (B, V)`, and its verify step
    for speculative decoding; `self.verify(tokens (B,T), pos (T,)) -> logits (B, T, V)`.

    `compile_s` accumulates first-call (compile or cache-load) time, so callers can report it.
    """

    native: NativeStep | None = None  # the steps in C (block-quantized models): nothing is compiled

    def __init__(self, model: Transformer, exact: bool | None = None) -> None:
        self.model = model
        # exact: round every bf16/fp16 intermediate where eager PyTorch rounds it (inductor's
        # emulate_precision_casts), so the compiled steps equal eager decode_step bit for bit and a T-token
        # verify step equals T one-token steps: plain and speculative greedy decoding then give the same text
        # (eager decoding too, but where csrc/pointwise.c's RMSNorm/SiLU land on a rounding tie).
        # None (the default): exact wherever attention runs in the C kernel (kernels/cache_attention.py),
        # where it costs nothing (default model, AVX512-BF16 path: 6.01 vs 6.13 ms a step, interleaved). Where
        # attention is left to inductor, exact rounding makes its fused loop ~10-25 % slower: plain decoding
        # then runs inexact and only speculation's verifier asks for exact steps.
        if exact is None:
            exact = cache_attention.available()
        self.exact = exact and model.dtype in (torch.bfloat16, torch.float16)
        self.compile_s = 0.0
        self.note = ""
        self.enabled = False  # False: eager decode_step (no compiler, or compiling failed)
        self._fns: dict[tuple, Callable] = {}  # (kind, batch, tokens, cache slots, dtype) -> compiled step
        # Block-quantized models (the shipped GGUF) run their steps in C instead: nothing to compile, no inductor
        # in memory, and the logits equal eager decode_step's bit for bit (native_step.py).
        t0 = time.perf_counter()
        self.native, _ = NativeStep.create(model)
        self.compile_s += time.perf_counter() - t0  # a C build on first use, once per machine
        if self.native is not None:
            self.exact = model.dtype in (torch.bfloat16, torch.float16)
            self.enabled = True
            self.note = "decode step in C (nothing compiled)"
            return
        reason = compiler_available()
        if reason is not None:
            self.note = f"compiled decode unavailable ({reason}); using eager PyTorch"
            return
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir()))
        import torch._inductor.config as inductor_config

        inductor_config.cpp_wrapper = True
        # The C++ wrapper (one call per op: ~300 KB of C++ for the default model) builds at -O1 apart from the
        # fused kernels (-O3): g++ time for the first step drops from ~63 s to ~10 s on 2 cores, decode speed is
        # unchanged. Precompiled headers cost ~11 s per machine (in /tmp) and did not speed the build up: off.
        inductor_config.cpp_wrapper_build_separate = True
        inductor_config.cpp_cache_precompile_headers = False
        inductor_config.fx_graph_cache = True
        marker = _isa_marker()
        self._isa_trusted = marker.is_file() and marker.read_text() == _machine_id()
        if self._isa_trusted:
            # Inductor checks each SIMD instruction set by building and loading a probe library in a child
            # Python (~0.9 s per process). A compiled step already ran on this machine with this toolchain.
            inductor_config.cpp.vec_isa_ok = True
        self.enabled = True

    def _load_or_compile(self, key: tuple, token: torch.Tensor, pos: torch.Tensor) -> Callable:
        """The AOT-compiled step for this shape: loaded from disk, or compiled now and saved."""
        path = steps_dir() / f"decode-{step_fingerprint(self.model, key)}.bin"
        fn = None
        if path.is_file():
            try:
                with path.open("rb") as f:
                    fn = torch.compiler.load_compiled_function(f)
            except Exception:  # stale or unreadable: compile afresh
                fn = None
            else:
                with contextlib.suppress(OSError):  # a read-only cache is fine
                    os.utime(path)  # "last used", for prune_steps
        if fn is None:
            what = "decode step" if key[0] == "decode" else f"{key[2]}-token verify step (speculative decoding)"
            what = what + " (exact bf16 rounding)" if self.exact else what
            notice(f"compiling the {what} for a {key[3]}-token cache (once per machine and cache size; "
                   f"~30-60 s on 2 cores; saved in {steps_dir()})")
            opts = {"guard_filter_fn": _serializable_guards, "emulate_precision_casts": self.exact}
            traced = _decode if key[0] == "decode" else _verify
            fn = torch.compile(traced, fullgraph=True, dynamic=False, options=opts).aot_compile(
                ((self.model, token, pos), {}))
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                fn.save_compiled_function(str(tmp))
                os.replace(tmp, path)  # atomic: a concurrent process never reads half a file
                prune_steps()
            except OSError as e:  # a read-only or full cache: use the step, compile again next time
                tmp.unlink(missing_ok=True)
                self.note = f"compiled decode step not saved ({e.strerror or e})"
        fn._guard_check_enabled = False  # the file name already pins every shape and dtype
        model = self.model
        return lambda t, p: fn(model, t, p)

    def _compile_jit(self, method: Callable) -> Callable:
        # Fallback when the AOT path fails. A fresh copy of the step's code object per shape: dynamo keeps
        # compiled entries per code object and checks them one after another on every call, so with one shared
        # code object each extra bucket adds a failing guard check to every step, and the 9th bucket would hit
        # dynamo's recompile limit (8) and silently run eager.
        fn = types.FunctionType(method.__code__.replace(), method.__globals__, method.__name__)
        return torch.compile(types.MethodType(fn, self.model), fullgraph=True, dynamic=False,
                             options={"emulate_precision_casts": self.exact})

    def step(self, token: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        if self.native is not None:
            return self.native.step(token, pos)
        return self._run("decode", token, pos)

    def verify(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Logits of T consecutive tokens. Compiled for the VERIFY_SIZES only: a shorter input is padded (the
        pad tokens' cache writes land after the real ones, where attention masks them and the next call writes
        over them), so the cache needs VERIFY_SIZES[-1] - 1 spare slots; longer inputs run eager."""
        if self.native is not None:
            return self.native.verify(tokens, pos)
        T = tokens.shape[1]
        size = next((n for n in VERIFY_SIZES if n >= T), None)
        if size is None or not self.enabled:
            return self.model.verify_step(tokens, pos)
        if size > T:
            tokens = torch.cat([tokens, tokens[:, -1:].expand(-1, size - T)], dim=1)
            pos = torch.arange(int(pos[0]), int(pos[0]) + size)
        return self._run("verify", tokens, pos)[:, :T]

    def _run(self, kind: str, token: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        method = Transformer.decode_step if kind == "decode" else Transformer.verify_step
        if not self.enabled:
            return method(self.model, token, pos)
        cache = self.model.layers[0].self_attn.cache
        key = (kind, token.shape[0], token.shape[1], cache.k.shape[2], cache.k.dtype, self.exact)
        fn = self._fns.get(key)
        if fn is not None:
            return fn(token, pos)
        t0 = time.perf_counter()
        try:
            try:
                fn = self._load_or_compile(key, token, pos)
                out = fn(token, pos)
            except Exception as e:  # the AOT path is experimental in torch: fall back to plain torch.compile
                self.note = f"AOT-compiled step unavailable ({type(e).__name__}); compiled with torch.compile"
                fn = self._compile_jit(method)
                out = fn(token, pos)
        except Exception as e:  # a broken toolchain must not break generation
            self.enabled = False
            self.note = f"compiled decode failed ({type(e).__name__}); using eager PyTorch"
            print(f"edgellm: {self.note}", file=sys.stderr)
            return method(self.model, token, pos)
        self.compile_s += time.perf_counter() - t0
        self._fns[key] = fn
        if not self._isa_trusted:  # missing, or written for another CPU / compiler / torch
            with contextlib.suppress(OSError):  # a read-only cache only costs the probe next time
                _isa_marker().parent.mkdir(parents=True, exist_ok=True)
                _isa_marker().write_text(_machine_id())
            self._isa_trusted = True
        return out
