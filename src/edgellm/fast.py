"""The compiled decode step: torch.compile of `Transformer.decode_step`, cached on disk across processes.

Why: at this model size a decode step is ~100 tiny ops and eager PyTorch spends most of its time in
Python/dispatcher overhead. Inductor fuses the step into a few C++ kernels (cpp_wrapper removes the
remaining Python). Shapes are static (a KV cache of a fixed bucket size and a (1,) position tensor), so
each cache bucket compiles once; the FX-graph cache makes later processes reuse the artifacts.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path

import torch

from .model import Transformer

CACHE_BUCKET = 256  # KV-cache lengths are rounded up to a multiple of this, so few shapes get compiled
# (the compiled step attends over the whole bucket: 256 vs 512 is ~6% faster decode on the default model)


def cache_dir() -> Path:
    root = os.environ.get("EDGELLM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "edgellm")
    return Path(root) / "inductor"


def compiler_available() -> str | None:
    """None if a C++ compiler inductor can use is present, else the reason it is not."""
    cxx = os.environ.get("CXX") or "g++"
    if shutil.which(cxx) is None and shutil.which("c++") is None:
        return f"no C++ compiler ({cxx}) on PATH"
    return None


def bucket(length: int) -> int:
    return -(-length // CACHE_BUCKET) * CACHE_BUCKET


class CompiledDecoder:
    """Wraps one model's decode step; `self.step(token (B,1), pos (1,)) -> logits (B, V)`.

    `compile_s` accumulates first-call (compile or cache-load) time, so callers can report it.
    """

    def __init__(self, model: Transformer) -> None:
        self.model = model
        self.compile_s = 0.0
        self.note = ""
        self.enabled = False  # False: eager decode_step (no compiler, or compiling failed)
        self._fns: dict[tuple, Callable] = {}  # (batch, cache slots, dtype) -> compiled step
        reason = compiler_available()
        if reason is not None:
            self.note = f"compiled decode unavailable ({reason}); using eager PyTorch"
            return
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir()))
        import torch._inductor.config as inductor_config

        inductor_config.cpp_wrapper = True
        inductor_config.fx_graph_cache = True
        self.enabled = True

    def _compile(self) -> Callable:
        # A fresh copy of decode_step's code object per cache shape: dynamo keeps compiled entries per code
        # object and checks them one after another on every call, so with one shared code object each extra
        # bucket adds a failing guard check to every step (benchmark_exact's tg128 went from 155 to 181 t/s
        # with this copy), and the 9th bucket would hit dynamo's recompile limit (8) and silently run eager.
        fn = types.FunctionType(Transformer.decode_step.__code__.replace(), Transformer.decode_step.__globals__,
                                "decode_step")
        return torch.compile(types.MethodType(fn, self.model), fullgraph=True, dynamic=False)

    def step(self, token: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return self.model.decode_step(token, pos)
        cache = self.model.layers[0].self_attn.cache
        key = (token.shape[0], cache.k.shape[2], cache.k.dtype)
        fn = self._fns.get(key)
        if fn is not None:
            return fn(token, pos)
        t0 = time.perf_counter()
        try:
            fn = self._compile()
            out = fn(token, pos)
        except Exception as e:  # a broken toolchain must not break generation
            self.enabled = False
            self.note = f"compiled decode failed ({type(e).__name__}); using eager PyTorch"
            print(f"edgellm: {self.note}", file=sys.stderr)
            return self.model.decode_step(token, pos)
        self.compile_s += time.perf_counter() - t0
        self._fns[key] = fn
        return out
