"""The decode and verify steps as one C call (kernels/csrc/decode_step.c), for models whose linears all keep
block-quantized weights (the shipped GGUF model and other Q4_0/Q4_1/Q8_0 files, loaded with `--dtype auto`).

Why: the compiled step (fast.py) exists to remove eager PyTorch's per-op overhead, but it costs ~40 s of compiling
per cache size on 2 cores and ~130 MB of memory for inductor's machinery. Once the products (qmatmul), attention
over the cache, RMSNorm and SiLU are C kernels, the rest of a step is glue: decode_step.c runs the layers' loop,
calling those same kernels through function pointers, and rounds every intermediate where eager torch does. So the
logits equal eager `Transformer.decode_step` / `verify_step` bit for bit, a T-token verify equals T steps bit for bit
(speculative decoding's greedy identity), and nothing is compiled beyond a ~1 s C build once per machine.

Python does the embedding lookup before the call and the lm_head after it (any lm_head type). `NativeStep.create`
returns None (with the reason) where a layer is not block-quantized (float, RTN/AWQ int4, LoRA-wrapped), the dtype is
not fp32/bf16, or a kernel is missing; callers then compile or decode eagerly. `EDGELLM_NATIVE_STEP=0` turns it off.
"""

from __future__ import annotations

import ctypes
import functools
import os

import torch

from .kernels import blockq, cache_attention, native
from .kernels.blocklinear import BlockQLinear
from .model import RMSNorm, Transformer


@functools.cache
def _library() -> tuple | None:
    """(decode_step.c's entry point, its layer-table width, its dims count, the addresses of the qmatmul, rmsnorm,
    silu_mul and cache-attention kernels it calls), or None where one of them is not built."""
    fns = blockq._c_kernels()
    attention = cache_attention._c_function() if cache_attention.available() else None
    if fns is None or attention is None or native.pointwise() is None:
        return None
    pointwise = native._functions("pointwise", "edgellm_rmsnorm", "edgellm_silu_mul")
    step = native._functions("decode_step", "edgellm_decode_step", "edgellm_step_layer_fields", "edgellm_step_dims")
    if pointwise is None or step is None:
        return None
    run, layer_fields, dims = step
    layer_fields.restype = dims.restype = ctypes.c_int
    run.restype = ctypes.c_int
    run.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_float, ctypes.c_float] + \
        [ctypes.c_void_p] * 5 + [ctypes.c_void_p] * 4 + [ctypes.c_void_p] * 2
    native.reasons["decode_step"] = ""
    address = [ctypes.cast(f, ctypes.c_void_p).value for f in (fns[0], *pointwise, attention)]
    return run, layer_fields(), dims(), address


@functools.cache
def _rows_attention() -> int | None:
    """The address of decode_attention.c's per-row kernel (continuous batching), or None."""
    if native.decode_attention() is None:
        return None
    lib, _ = native.decode_attention_library()
    return ctypes.cast(lib.edgellm_decode_attention, ctypes.c_void_p).value


def unsupported(model: Transformer) -> str | None:
    """Why this model's steps cannot run in C (None: they can)."""
    if os.environ.get("EDGELLM_NATIVE_STEP", "1") == "0":
        return "EDGELLM_NATIVE_STEP=0"
    if model.dtype not in (torch.float32, torch.bfloat16):
        return f"activations in {model.dtype}"
    cfg = model.config
    if cfg.head_dim > 256 or cfg.head_dim % 2:
        return f"head dim {cfg.head_dim}"
    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        for lin in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj):
            if type(lin) is not BlockQLinear or lin.isa < 0:
                return f"{type(lin).__name__} layers (only block-quantized ones run in C)"
            if lin.bias is not None and lin.bias.dtype != model.dtype:
                return "a bias in another dtype"
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            if type(norm) is not RMSNorm or norm.weight.dtype != model.dtype:
                return "a norm in another dtype"
    if _library() is None:
        why = native.reasons.get("decode_step") or native.reasons.get("qmatmul") or \
            native.reasons.get("cache_attention") or native.reasons.get("pointwise") or "a kernel is missing"
        return f"C step unavailable ({why})"
    return None


def fast_without_compiling(model: Transformer) -> bool:
    """True where the fast decode path needs no compiling (the steps run in C): `compile=None` takes it then."""
    return unsupported(model) is None


class NativeStep:
    """`step(tokens (B, 1), pos (1,)) -> logits (B, V)` and `verify(tokens (B, T), pos (T,)) -> (B, T, V)`, fp32,
    over the model's current KV caches (set up by `Transformer.setup_cache`)."""

    def __init__(self, model: Transformer) -> None:
        reason = unsupported(model)
        if reason is not None:
            raise ValueError(reason)
        self.model = model
        self.run, self.layer_fields, self.n_dims, self.kernels = _library()
        self._tables: dict[tuple, tuple[list, torch.Tensor]] = {}  # caches' ids -> (caches, their table)

    @classmethod
    def create(cls, model: Transformer) -> tuple[NativeStep | None, str]:
        """(the step, "") or (None, why not)."""
        try:
            return cls(model), ""
        except ValueError as e:
            return None, str(e)

    def _layer_table(self) -> torch.Tensor:
        """Every layer's weights and cache as addresses (decode_step.c's layer fields), one table per set of caches
        (setup_cache makes new ones; a server switches between its pool and row views)."""
        caches = [layer.self_attn.cache for layer in self.model.layers]
        key = tuple(map(id, caches))
        if key in self._tables:
            return self._tables[key][1]
        if len(self._tables) > 64:  # caches replaced over a long run: forget the old ones
            self._tables.clear()
        rows = []
        for layer, cache in zip(self.model.layers, caches, strict=True):
            attn, mlp = layer.self_attn, layer.mlp
            row = [layer.input_layernorm.weight.data_ptr()]
            row += self._linear(attn.qkv_proj) + self._linear(attn.o_proj)
            row += [layer.post_attention_layernorm.weight.data_ptr()]
            row += self._linear(mlp.gate_up_proj) + self._linear(mlp.down_proj)
            row += [cache.k.data_ptr(), cache.v.data_ptr(), cache.slot_pos.data_ptr()]
            rows.append(row)
        table = torch.tensor(rows, dtype=torch.int64)
        assert table.shape[1] == self.layer_fields, "decode_step.c and native_step.py disagree on the layout"
        self._tables[key] = caches, table  # the caches kept alive: their ids stay theirs
        return table

    @staticmethod
    def _linear(lin: BlockQLinear) -> list[int]:
        bias = 0 if lin.bias is None else lin.bias.data_ptr()
        return [lin.bits, lin.qs.data_ptr(), lin.dm.data_ptr(), bias]

    def _hidden(self, tokens: torch.Tensor, pos: torch.Tensor, rows: list[int] | None = None,
                prefill: bool = False) -> torch.Tensor | None:
        """The final-normed hidden states (B, T, C), or None where the eager step must run instead. rows: the cache
        row of each sequence (T = 1, pos (B,): each its own position), as `Transformer.batch_decode_step`.
        prefill: a prompt chunk of the serving engine (see `prefill`), not bound to equal an eager step."""
        m = self.model
        B, T = tokens.shape
        attn = m.layers[0].self_attn
        cache = attn.cache
        limit = self.prefill_rows() if prefill else BlockQLinear.DENSE_FROM_ROWS
        if B * T >= limit or not cache.k.is_contiguous():
            return None  # decode/verify sizes (no kernel's dense_from_rows is below this), or a prompt chunk the
            # eager forward would multiply with the same int8 kernel
        if rows is None and ((not attn.cache_kernel and not prefill) or cache.k.shape[0] != B):
            return None  # ... or a masked attention in torch
        rows_attention = None
        if rows is not None:
            rows_attention = _rows_attention()
            if (rows_attention is None or cache.rolling or cache.k.dtype != m.dtype
                    or any(not 0 <= r < cache.k.shape[0] for r in rows)):
                return None
        cfg = m.config
        x = m.embed_tokens(tokens).to(m.dtype).contiguous()              # (B, T, C)
        pos = pos.to(torch.long).contiguous()                             # read as int64 by the C code
        cos = m.rope_cos.index_select(0, pos).to(m.dtype)                # (T, D), or (B, D) by rows
        sin = m.rope_sin.index_select(0, pos).to(m.dtype)
        hidden = torch.empty_like(x)
        lin = attn.qkv_proj
        dims = (ctypes.c_int64 * self.n_dims)(
            int(m.dtype == torch.bfloat16), lin.isa, B, T, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads,
            cfg.head_dim, cfg.intermediate_size, cfg.num_layers, cache.size, int(cache.rolling), attn.window or 0,
            torch.get_num_threads())
        row_ids = None if rows is None else (ctypes.c_int64 * B)(*rows)
        rc = self.run(dims, self._layer_table().data_ptr(), m.norm.weight.data_ptr(), m.config.rms_norm_eps,
                      cfg.head_dim ** -0.5, x.data_ptr(), pos.data_ptr(), cos.data_ptr(), sin.data_ptr(),
                      hidden.data_ptr(), *self.kernels, row_ids, rows_attention)
        if rc != 0:
            raise MemoryError(f"edgellm decode step: a kernel failed (code {rc}; out of memory?)")
        return hidden

    def step(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        hidden = self._hidden(tokens, pos)
        if hidden is None:
            return self.model.decode_step(tokens, pos)
        return self.model.lm_head(hidden)[:, -1].float()

    def verify(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        hidden = self._hidden(tokens, pos)
        if hidden is None:
            return self.model.verify_step(tokens, pos)
        return self.model.lm_head(hidden).float()

    def prefill_rows(self) -> int:
        """Prompt chunks shorter than this run in C (`prefill`): the sizes at which the eager forward's products
        also take the int8 kernel (BlockQLinear.dense_from_rows: every kernel, below 96 rows with AMX), so only
        the ~15 ms of eager glue per call goes."""
        return self.model.layers[0].self_attn.qkv_proj.dense_from_rows

    def prefill(self, tokens: torch.Tensor, start: int) -> torch.Tensor | None:
        """A prompt chunk (1, T) at positions start.. through the verify step (each token's keys/values and logits
        exactly as T decode steps would compute them), into the model's current caches (a pooled row's views, slot
        == position) -> the last token's logits (V,), fp32; None where the eager forward must run."""
        T = tokens.shape[1]
        m = self.model
        if m.rope_cos is None or m.rope_cos.shape[0] < start + T:
            return None
        hidden = self._hidden(tokens, torch.arange(start, start + T), prefill=True)
        if hidden is None:
            return None
        return m.lm_head(hidden[:, -1:])[0, -1].float()

    def batch_step(self, tokens: torch.Tensor, rows: list[int], pos: list[int]) -> torch.Tensor:
        """Continuous batching (`Transformer.batch_decode_step`'s contract): tokens (B, 1), sequence b in cache row
        rows[b] of the layers' pooled caches at position pos[b] -> next-token logits (B, V), fp32."""
        m = self.model
        if m.rope_cos is None or m.rope_cos.shape[0] <= max(pos):  # as batch_decode_step (setup_cache covers steps)
            m.init_rope(max(max(pos) + 1, m.config.max_seq_len))
        hidden = self._hidden(tokens, torch.tensor(pos), rows)
        if hidden is None:
            return self.model.batch_decode_step(tokens, rows, pos)
        return self.model.lm_head(hidden)[:, -1].float()
