"""Give freed heap memory back to the operating system after big transient work (loading, quantizing).

Loading streams tensors through temporaries (dequantized GGUF blocks, fp32 quantization scratch); glibc keeps
much of that freed memory in its heap and arenas, so the process stays large though the model is small:
loading the default model's int4 checkpoint left ~200 MB of free heap resident. `malloc_trim(0)` returns it.
A no-op on systems without glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def release_free_memory() -> None:
    gc.collect()
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
