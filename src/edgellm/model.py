"""Pure nn.Modules for the Llama family (Llama 2/3.x, Mistral, Phi-3, Qwen2) plus a static KV cache.

Every architecture is stored the same way: q/k/v fused into one `qkv_proj` (rows: q, then k, then v)
and gate/up fused into `gate_up_proj` (rows: gate, then up), as Phi-3 checkpoints already are. The
loaders fuse Llama/Mistral/Qwen2 checkpoints into this layout, so the forward pass is one code path.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig, rope_inv_freq
from .kernels import cache_attention, native, train_ops


@dataclass
class Packed:
    """Rows that each hold several sequences sharing a prefix (eval/engine.py packs an item's context once, then
    its answers): token (b, t) is at position positions[b, t] and sees the row's tokens j <= t with
    j < shared[b] (the prefix) or j >= lo[b, t] (its own segment). No KV cache."""
    positions: torch.Tensor  # (B, T) int64
    lo: torch.Tensor         # (B, T) int64
    shared: torch.Tensor     # (B,) int64


def _eager_inference(*tensors: torch.Tensor) -> bool:
    """True where a C kernel may stand in for torch ops: not while torch.compile traces (inductor fuses those ops
    itself) and not when autograd records (the kernels have no backward)."""
    if torch.compiler.is_compiling():
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _eager_inference(x, self.weight) and (kernels := native.pointwise()) is not None:
            y = kernels.rmsnorm(x, self.weight, self.eps)  # the formula below in one pass (C)
            if y is not None:
                return y
        elif torch.is_grad_enabled() and x.requires_grad and (y := train_ops.rmsnorm(x, self.weight, self.eps)) \
                is not None:  # training: the same formula, one pass each way (kernels/train_ops.py)
            return y
        # Normalise in fp32 and cast back before the weight multiply, as HF does (matters in bf16).
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class KVCache(nn.Module):
    """Preallocated keys/values for one layer.

    `size` slots hold positions. A full cache has one slot per position (slot == position). A rolling cache
    (Mistral sliding window; size == window, plus spare slots for speculative rollback) writes position p into
    slot p % size and remembers which position each slot holds, so attention can mask by real positions.
    """

    def __init__(self, batch: int, kv_heads: int, size: int, head_dim: int, dtype: torch.dtype,
                 rolling: bool) -> None:
        super().__init__()
        self.rolling = rolling
        self.size = size
        self.register_buffer("k", torch.zeros(batch, kv_heads, size, head_dim, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(batch, kv_heads, size, head_dim, dtype=dtype), persistent=False)
        self.register_buffer("slot_pos", torch.full((size,), -1, dtype=torch.long), persistent=False)

    def reset(self) -> None:
        self.slot_pos.fill_(-1)

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Store k, v (B, Hkv, T, D) for positions start..start+T-1; return the keys/values to attend to
        and the position of each key (L,)."""
        B, _, T, _ = k.shape
        pos = torch.arange(start, start + T, device=k.device)
        if not self.rolling:
            if start + T > self.size:
                raise IndexError(f"KV cache holds {self.size} positions; asked for {start + T}")
            self.k[:B, :, start:start + T] = k
            self.v[:B, :, start:start + T] = v
            self.slot_pos[start:start + T] = pos
            return self.k[:B, :, :start + T], self.v[:B, :, :start + T], self.slot_pos[:start + T]
        # Rolling: attend over (old slots ++ new tokens), then keep only the newest `size` tokens. Old slots at
        # positions >= start are stale (written ahead, then rolled back): marked empty, the new tokens replace them.
        k_all = torch.cat([self.k[:B], k], dim=2)  # (B, Hkv, size+T, D)
        v_all = torch.cat([self.v[:B], v], dim=2)
        kpos = torch.cat([self.slot_pos.masked_fill(self.slot_pos >= start, -1), pos])
        n = min(T, self.size)
        slots = pos[-n:] % self.size
        self.k[:B, :, slots] = k[:, :, -n:]
        self.v[:B, :, slots] = v[:, :, -n:]
        self.slot_pos[slots] = pos[-n:]
        return k_all, v_all, kpos


    def row(self, r: int) -> KVCache:
        """A one-sequence view of row r of a full (non-rolling) cache: writes land in this cache's storage.
        Continuous batching prefills each pooled sequence through its row's view (slot == position)."""
        if self.rolling:
            raise ValueError("row views need a full cache (slot == position)")
        view = KVCache.__new__(KVCache)
        nn.Module.__init__(view)
        view.rolling, view.size = False, self.size
        view.register_buffer("k", self.k[r:r + 1], persistent=False)  # (1, Hkv, S, D) view
        view.register_buffer("v", self.v[r:r + 1], persistent=False)
        view.register_buffer("slot_pos", torch.arange(self.size), persistent=False)
        return view

    def write(self, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Static-shape write of T positions (pos: (T,) long tensor) for the compiled decode/verify steps."""
        slot = pos % self.size if self.rolling else pos
        self.k.index_copy_(2, slot, k)  # (B, Hkv, T, D) into (B, Hkv, S, D)
        self.v.index_copy_(2, slot, v)
        self.slot_pos.index_copy_(0, slot, pos)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """HF's x * cos + rotate_half(x) * sin, where rotate_half([x1, x2]) = [-x2, x1].

    HF layout: the head dim is split in halves [x1, x2] (not interleaved pairs as in Meta's original code;
    GGUF llama weights are permuted for interleaved RoPE and the GGUF loader undoes that). The minus sign lives
    in the table (`sin_signed` = [-sin, sin], see Transformer.init_rope), which saves a negation pass; the
    products are the same numbers, so results are bit-identical to HF's formula."""
    h = x.shape[-1] // 2
    return x * cos + torch.cat((x[..., h:], x[..., :h]), dim=-1) * sin_signed


TRAIN_ATTN_BYTES = 16 << 20  # bf16 training takes blocked_causal_attention while a layer keeps at most this much
ATTN_BLOCK = 64             # query rows per block of blocked_causal_attention (64 beat 32 and 128 at 2048 tokens)
ATTN_BLOCK_WIDE = 128       # ... or twice that while the block's scores stay this small:
ATTN_SCORE_BYTES = 1_200_000  # (an L2-sized (heads, rows, keys) tile: 128 rows won at 512 tokens, 4-5 %)


def blocked_training_attention(batch: int, heads: int, T: int, bytes_per_value: int = 2) -> bool:
    """Whether half-precision training of T tokens takes blocked_causal_attention: its backward keeps each block's
    probabilities (~T (T + ATTN_BLOCK_WIDE) / 2 values per sequence and head, quadratic in T), so long sequences
    keep torch's flash kernel (linear memory, slower in bf16). The memory calculator uses the same rule."""
    return batch * heads * T * (T + ATTN_BLOCK_WIDE) // 2 * bytes_per_value <= TRAIN_ATTN_BYTES


def blocked_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:
    """Causal attention of q (B, H, T, D) at positions start.. over keys/values (B, Hkv, >= start+T, D) whose
    slot j holds position j. Half-precision prefill path.

    Why not SDPA: on CPUs without AMX, torch's flash-attention kernel runs bf16 at fp32 speed (~4 ms per
    layer for 512 tokens of the default model). Here each block of 64 or 128 queries does two bf16 GEMMs over
    only the keys it can see (the GQA group's heads stacked as rows of one GEMM) and a softmax that accumulates
    in fp32: 2-3x faster, and it serves the cached-prefix case (start > 0) without an explicit (T, L) mask.
    Scores and probabilities are rounded to the input dtype, as in HF's eager bf16 attention. Every query
    row's result is the same whatever the block size.
    """
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return _BlockedAttention.apply(q, k, v, start)
    return _blocked_forward(q, k, v, start, None)


def _blocks(B: int, H: int, T: int, start: int, element_size: int) -> list[tuple[int, int]]:
    """The query blocks [i, e) of blocked_causal_attention: ATTN_BLOCK_WIDE rows while the block's scores stay
    within ATTN_SCORE_BYTES, else ATTN_BLOCK."""
    out, i = [], 0
    while i < T:
        wide = B * H * ATTN_BLOCK_WIDE * (start + min(T, i + ATTN_BLOCK_WIDE)) * element_size <= ATTN_SCORE_BYTES
        e = min(T, i + (ATTN_BLOCK_WIDE if wide else ATTN_BLOCK))
        out.append((i, e))
        i = e
    return out


def _blocked_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int,
                     probs: list[torch.Tensor] | None) -> torch.Tensor:
    """blocked_causal_attention's computation; each block's probabilities appended to `probs` if given."""
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    G = H // Hkv
    qs = (q * D ** -0.5).reshape(B * Hkv, G, T, D)                     # (B*Hkv, G, T, D)
    kk = k[:, :, :start + T].reshape(B * Hkv, start + T, D)           # (B*Hkv, L, D)
    vv = v[:, :, :start + T].reshape(B * Hkv, start + T, D)
    tri = torch.full((ATTN_BLOCK_WIDE, ATTN_BLOCK_WIDE), float("-inf"), dtype=q.dtype).triu_(1)
    y = q.new_empty(B * Hkv, G, T, D)
    for i, e in _blocks(B, H, T, start, q.element_size()):
        t, L = e - i, start + e                                       # queries in this block, keys they see
        qi = qs[:, :, i:e].reshape(B * Hkv, G * t, D)
        s = torch.bmm(qi, kk[:, :L].transpose(1, 2)).view(B * Hkv, G, t, L)  # (B*Hkv, G, t, L)
        s[..., L - t:] += tri[:t, :t]                                 # the causal triangle of this block
        # softmax straight on bf16 accumulates in fp32 and rounds once, like softmax(dtype=fp32).to(bf16)
        # (bit-identical here), but torch's CPU kernel for that is ~8x faster than the fp32-output one.
        p = torch.softmax(s, dim=-1).view(B * Hkv, G * t, L)
        if probs is not None:
            probs.append(p)
        y[:, :, i:e] = torch.bmm(p, vv[:, :L]).view(B * Hkv, G, t, D)
    return y.view(B, H, T, D)


class _BlockedAttention(torch.autograd.Function):
    """blocked_causal_attention with its backward written out: per block, the softmax backward and four bmm whose
    key/value gradients add into one buffer in place. Autograd of the forward's slices instead made a zero-filled
    full-size gradient per block and slice and summed them (~0.1 s of a 1.3 s LoRA step on the default model)."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:  # noqa: ANN001
        probs: list[torch.Tensor] = []
        y = _blocked_forward(q, k, v, start, probs)
        ctx.save_for_backward(q, k, v, *probs)
        ctx.start = start
        return y

    @staticmethod
    def backward(ctx, gy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None]:  # noqa: ANN001
        q, k, v, *probs = ctx.saved_tensors
        start = ctx.start
        B, H, T, D = q.shape
        Hkv, S = k.shape[1], k.shape[2]
        G, L_all = H // Hkv, start + T
        qs = (q * D ** -0.5).reshape(B * Hkv, G, T, D)
        kk = k[:, :, :L_all].reshape(B * Hkv, L_all, D)
        vv = v[:, :, :L_all].reshape(B * Hkv, L_all, D)
        gy = gy.to(q.dtype).reshape(B * Hkv, G, T, D)
        dqs = torch.empty_like(qs)
        dk = k.new_zeros(B * Hkv, L_all, D)
        dv = v.new_zeros(B * Hkv, L_all, D)
        for (i, e), p in zip(_blocks(B, H, T, start, q.element_size()), probs, strict=True):
            t, L = e - i, start + e
            dy = gy[:, :, i:e].reshape(B * Hkv, G * t, D)
            qi = qs[:, :, i:e].reshape(B * Hkv, G * t, D)
            dv[:, :L].baddbmm_(p.transpose(1, 2), dy)                        # (L, Gt) @ (Gt, D)
            ds = torch._softmax_backward_data(torch.bmm(dy, vv[:, :L].transpose(1, 2)), p, -1, p.dtype)
            dqs[:, :, i:e] = torch.bmm(ds, kk[:, :L]).view(B * Hkv, G, t, D)
            dk[:, :L].baddbmm_(ds.transpose(1, 2), qi)
        dq = (dqs * D ** -0.5).view(B, H, T, D)
        dk, dv = dk.view(B, Hkv, L_all, D), dv.view(B, Hkv, L_all, D)
        if S > L_all:  # keys past the queries' positions (a longer cache) get no gradient
            dk, dv = F.pad(dk, (0, 0, 0, S - L_all)), F.pad(dv, (0, 0, 0, S - L_all))
        return dq, dk, dv, None


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int,
                     segments: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor | None:
    """Prefill attention (arguments as blocked_causal_attention) -> (B, T, H, D), or None for fp32 without the
    C kernel (the caller's SDPA is then the fastest torch path). segments: Packed rows' (lo, shared) (start 0);
    only the C kernels take them, None otherwise (the caller's SDPA then takes the explicit mask).

    Head dim 64 runs our C kernels where they could be built: bf16 with AVX512-BF16 dot products
    (csrc/attention_bf16.c, 2-3x faster than the torch path at 512 tokens; fp32 scores, so it differs from
    the torch path within bf16 rounding), fp32 with AVX2 FMAs (csrc/attention_f32.c, vs torch's SDPA). Other
    half-precision cases take blocked_causal_attention."""
    if q.shape[-1] == native.ATTENTION_HEAD_DIM and q.dtype in (torch.bfloat16, torch.float32):
        attend = native.attention_bf16() if q.dtype == torch.bfloat16 else native.attention_f32()
        y = attend(q, k, v, start, segments) if attend is not None else None
        if y is not None:
            return y
    if q.dtype == torch.float32 or segments is not None:
        return None
    return blocked_causal_attention(q, k, v, start).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.n_heads, self.n_kv, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, cfg.q_size + 2 * cfg.kv_size, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(cfg.q_size, cfg.hidden_size, bias=False)
        self.window = cfg.sliding_window
        self.cache: KVCache | None = None
        # decode/verify attention through the C kernel (kernels/cache_attention.py); set by setup_cache, a plain
        # attribute so the compiled steps' fingerprint records which path they traced
        self.cache_kernel = False

    def _project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, C) -> q (B, H, T, D), k, v (B, Hkv, T, D), q and k rotated by cos/sin: (T, D) rows per position
        or (B, T, D) per token."""
        B, T, _ = x.shape
        H, Hkv, D = self.n_heads, self.n_kv, self.head_dim
        qkv = self.qkv_proj(x)                                          # (B, T, (H + 2 Hkv) D)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        if torch.is_grad_enabled() and qkv.requires_grad and cos.dim() == 2 and (
                qkv_heads := train_ops.rope_qkv(qkv, H, Hkv, cos, sin)) is not None:
            return qkv_heads  # training: one pass each way (kernels/train_ops.py)
        # q and k are adjacent in the fused projection: rotate both heads' sets in one pass (in place in C, the
        # same bits as apply_rope, where no gradient needs the unrotated values).
        qk = qkv[..., :self.cfg.q_size + self.cfg.kv_size].view(B, T, H + Hkv, D)
        kernels = native.pointwise() if _eager_inference(qkv) else None
        if kernels is None or not kernels.rope_(qkv, H + Hkv, D, cos.reshape(-1, D), sin.reshape(-1, D)):
            qk = apply_rope(qk, cos.unsqueeze(-2), sin.unsqueeze(-2))    # (B, T, H + Hkv, D)
        q = qk[:, :, :H].transpose(1, 2)                                # (B, H, T, D)
        k = qk[:, :, H:].transpose(1, 2)                                # (B, Hkv, T, D)
        v = qkv[..., self.cfg.q_size + self.cfg.kv_size:].view(B, T, Hkv, D).transpose(1, 2)  # (B, Hkv, T, D)
        return q, k, v

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start: int,
                use_cache: bool) -> torch.Tensor:
        """x (B, T, C) at positions start..; cos/sin: (T, D) rows of the model's RoPE tables."""
        B, T, _ = x.shape
        q, k, v = self._project(x, cos, sin)

        if use_cache:
            if self.cache is None:
                raise RuntimeError("call model.setup_cache() before decoding with use_cache=True")
            k_all, v_all, kpos = self.cache.update(start, k, v)
        else:
            k_all, v_all, kpos = k, v, torch.arange(start, start + T, device=x.device)
        L = k_all.shape[2]
        windowed = self.window is not None and start + T > self.window
        contiguous = not windowed and kpos.shape[0] == start + T  # key j holds position j
        # The C kernels have no backward: training (q/k/v needing gradients) takes torch ops below.
        if contiguous and T > 1 and _eager_inference(q, v):
            y = causal_attention(q, k_all, v_all, start)  # (B, T, H, D), or None: SDPA below
            if y is not None:
                return self.o_proj(y.reshape(B, T, self.cfg.q_size))
        elif (contiguous and T > 1 and x.dtype in (torch.bfloat16, torch.float16) and not torch.compiler.is_compiling()
              and blocked_training_attention(B, self.n_heads, start + T)):
            # Half-precision training: bf16 GEMMs over the visible keys of each block of queries, with autograd.
            # torch's CPU flash-attention kernel runs bf16 at fp32 speed; forward + backward of the default model
            # at 4 x 256 tokens took ~1 s of a 3.6 s LoRA step there (see blocked_causal_attention).
            y = blocked_causal_attention(q, k_all, v_all, start)          # (B, H, T, D)
            return self.o_proj(y.transpose(1, 2).reshape(B, T, self.cfg.q_size))
        if contiguous and (T == 1 or start == 0):
            # Plain causal cases need no explicit mask (fast SDPA paths).
            mask, is_causal = None, T > 1
        else:
            qpos = torch.arange(start, start + T, device=x.device)[:, None]  # (T, 1)
            mask = (kpos[None, :] <= qpos) & (kpos[None, :] >= 0)           # (T, L)
            if self.window is not None:
                mask &= kpos[None, :] > qpos - self.window
            is_causal = False
        assert L == kpos.shape[0]
        y = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask, is_causal=is_causal,
                                           enable_gqa=self.n_kv != self.n_heads)  # (B, H, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.cfg.q_size))

    def forward_packed(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, packed: Packed) -> torch.Tensor:
        """x (B, T, C) of packed rows (see Packed); cos/sin (B, T, D): the RoPE rows of each token's position."""
        B, T, _ = x.shape
        q, k, v = self._project(x, cos, sin)
        segments = (packed.lo, packed.shared)
        y = causal_attention(q, k, v, 0, segments) if _eager_inference(q, v) else None  # (B, T, H, D)
        if y is None:
            mask = native.segment_mask(T, 0, segments)                  # (B, 1, T, T)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                               enable_gqa=self.n_kv != self.n_heads).transpose(1, 2)
        return self.o_proj(y.reshape(B, T, self.cfg.q_size))

    def decode(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """T new tokens per sequence (x (B, T, C) at positions pos (T,); T = 1 to decode, more to verify
        speculative drafts) with static shapes only. Attention: the C kernel where it is built (`cache_kernel`:
        each query over the slots it may see, as one opaque op in the compiled step), else the whole cache with a
        position mask, written out so torch.compile/inductor can fuse it instead of calling SDPA."""
        B, T, _ = x.shape
        cache = self.cache
        if self.cache_kernel:
            H, Hkv, D = self.n_heads, self.n_kv, self.head_dim
            qkv = self.qkv_proj(x)                                                 # (B, T, (H + 2 Hkv) D)
            qk = qkv[..., :self.cfg.q_size + self.cfg.kv_size].view(B, T, H + Hkv, D)
            qk = apply_rope(qk, cos.to(x.dtype)[:, None], sin.to(x.dtype)[:, None])  # (B, T, H + Hkv, D)
            k = qk[:, :, H:].transpose(1, 2)                                        # (B, Hkv, T, D)
            v = qkv[..., self.cfg.q_size + self.cfg.kv_size:].view(B, T, Hkv, D).transpose(1, 2)
            cache.write(pos, k, v)
            # each query over the slots it may see, per-query arithmetic independent of T (see the kernel)
            y = cache_attention.cache_attention(qk[:, :, :H].contiguous(), cache.k, cache.v, cache.slot_pos, pos,
                                                self.window or 0)                  # (B, T, H, D)
            return self.o_proj(y.reshape(B, T, self.cfg.q_size))
        q, k, v = self.qkv_proj(x).split([self.cfg.q_size, self.cfg.kv_size, self.cfg.kv_size], dim=-1)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)     # (B, Hkv, T, D)
        v = v.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)                     # (T, D)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        cache.write(pos, k, v)
        group = self.n_heads // self.n_kv
        # Broadcast-multiply + sum instead of matmul: inductor fuses rope, the cache write, both reductions and
        # the softmax into one C++ loop; two tiny bmm calls per layer cost more than all of that (~17 us each).
        # The T queries of a group are stacked as G*T rows: for T = 1 this is the decode step's kernel, for T > 1
        # the same per-row loops (same sums, same order: a verify step equals T decode steps bit for bit).
        qg = q.reshape(B, self.n_kv, group * T, 1, self.head_dim).float()        # (B, Hkv, G*T, 1, D)
        scores = (qg * cache.k[:B].unsqueeze(2).float()).sum(-1)                  # (B, Hkv, G*T, S)
        scores = scores * self.head_dim ** -0.5
        # slots written ahead of a query (rolled-back drafts, later drafts of this call) are masked by position
        kpos, qpos = cache.slot_pos[None, :], pos[:, None]
        valid = (kpos >= 0) & (kpos <= qpos)                                       # (T, S)
        if self.window is not None:
            valid &= kpos > qpos - self.window
        valid = valid.repeat(group, 1)                                             # (G*T, S)
        probs = scores.masked_fill(~valid, float("-inf")).softmax(-1)              # (B, Hkv, G*T, S)
        y = (probs.unsqueeze(-1) * cache.v[:B].unsqueeze(2).float()).sum(-2)       # (B, Hkv, G*T, D)
        y = y.view(B, self.n_kv, group, T, self.head_dim).permute(0, 3, 1, 2, 4)  # (B, T, Hkv, G, D)
        y = y.reshape(B, T, self.cfg.q_size)
        return self.o_proj(y.to(x.dtype))

    def decode_rows(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rows: list[int],
                    pos: list[int], rows_t: torch.Tensor, pos_t: torch.Tensor) -> torch.Tensor:
        """One new token for each of B sequences of a pooled cache (continuous batching): x (B, 1, C), sequence b
        lives in cache row rows[b] at position pos[b] (rows_t, pos_t: the same as tensors, made once per step);
        cos/sin (B, D) are the rows of those positions, in x's dtype.

        Each row attends over exactly its own keys (slots lo..pos[b]) in its own kernel call, so a sequence's
        result never depends on which others share the step: a batched answer equals the same request alone."""
        B = x.shape[0]
        H, Hkv, D = self.n_heads, self.n_kv, self.head_dim
        cache = self.cache
        qkv = self.qkv_proj(x).view(B, H + 2 * Hkv, D)                           # (B, H + 2 Hkv, D)
        # q and k are adjacent in the fused projection: rotate both in one pass (few, small ops per step)
        qk = apply_rope(qkv[:, :H + Hkv], cos[:, None], sin[:, None])             # (B, H + Hkv, D)
        q, k, v = qk[:, :H], qk[:, H:], qkv[:, H + Hkv:]                         # (B, H, D), (B, Hkv, D) x2
        cache.k[rows_t, :, pos_t] = k                                             # (B, Hkv, D) into (P, Hkv, S, D)
        cache.v[rows_t, :, pos_t] = v
        lo = [0 if self.window is None else max(0, p + 1 - self.window) for p in pos]
        batched = native.decode_attention()
        if batched is not None:  # one C call for every row (each row's arithmetic its own)
            y = batched(q.contiguous(), cache.k, cache.v, rows, lo, pos)         # (B, H, D)
            if y is not None:
                return self.o_proj(y.reshape(B, 1, self.cfg.q_size))
        q = q[:, :, None]                                                         # (B, H, 1, D)
        attend = None
        if D == native.ATTENTION_HEAD_DIM:
            attend = native.attention_bf16() if x.dtype == torch.bfloat16 else (
                native.attention_f32() if x.dtype == torch.float32 else None)
        ys = []
        for b, (r, a, p) in enumerate(zip(rows, lo, pos, strict=True)):
            kk, vv = cache.k[r:r + 1, :, a:p + 1], cache.v[r:r + 1, :, a:p + 1]  # (1, Hkv, L, D): all visible
            y = attend(q[b:b + 1], kk, vv, p - a) if attend is not None else None  # (1, 1, H, D)
            if y is None:
                y = F.scaled_dot_product_attention(q[b:b + 1], kk, vv, enable_gqa=Hkv != H).transpose(1, 2)
            ys.append(y.reshape(1, 1, self.cfg.q_size))
        return self.o_proj(torch.cat(ys))                                          # (B, 1, C)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)                          # (B, T, 2 I): gate, then up
        if _eager_inference(gate_up) and (kernels := native.pointwise()) is not None:
            act = kernels.silu_mul(gate_up)                     # (B, T, I): the line below in one pass (C)
            if act is not None:
                return self.down_proj(act)
        elif torch.is_grad_enabled() and gate_up.requires_grad and (act := train_ops.silu_mul(gate_up)) is not None:
            return self.down_proj(act)                          # training: fused forward and backward
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start: int,
                use_cache: bool, packed: Packed | None = None) -> torch.Tensor:
        h = self.input_layernorm(x)
        if packed is not None:
            x = x + self.self_attn.forward_packed(h, cos, sin, packed)
        else:
            x = x + self.self_attn(h, cos, sin, start, use_cache)
        return x + self.mlp(self.post_attention_layernorm(x))


    def decode(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn.decode(self.input_layernorm(x), cos, sin, pos)
        return x + self.mlp(self.post_attention_layernorm(x))

    def decode_rows(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rows: list[int],
                    pos: list[int], rows_t: torch.Tensor, pos_t: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn.decode_rows(self.input_layernorm(x), cos, sin, rows, pos, rows_t, pos_t)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rope_cos: torch.Tensor | None = None
        self.rope_sin: torch.Tensor | None = None
        self.cache_len = 0

    @property
    def dtype(self) -> torch.dtype:
        """The activation dtype (quantized layers keep their own weight formats)."""
        return self.norm.weight.dtype

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings and isinstance(self.embed_tokens, nn.Embedding):
            self.lm_head.weight = self.embed_tokens.weight

    def init_rope(self, max_len: int | None = None) -> None:
        """(Re)compute the fp32 RoPE tables for positions 0..max_len-1 (after weights are materialised):
        rope_cos = [cos, cos] and rope_sin = [-sin, sin] per position (the sign of rotate_half, see apply_rope)."""
        n = max_len or self.config.max_seq_len
        inv_freq = rope_inv_freq(self.config)                                # (D/2,)
        freqs = torch.arange(n, dtype=torch.float32)[:, None] * inv_freq[None, :]  # (n, D/2), fp32 angles as HF
        # cos/sin in float64 by numpy on this thread, rounded once to fp32: torch's fp32 cos was seen to return values
        # off by ~6e-5 for the calling thread's half of the table in some processes (the first model loaded), which
        # made two loads of one checkpoint answer differently; this is the correctly rounded table every time.
        angles = freqs.double().numpy()
        cos, sin = torch.from_numpy(np.cos(angles)).float(), torch.from_numpy(np.sin(angles)).float()
        self.rope_cos = torch.cat([cos, cos], dim=-1)                        # (n, D)
        self.rope_sin = torch.cat([-sin, sin], dim=-1)

    def setup_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None, slack: int = 0) -> None:
        """Preallocate one KV cache per layer for `batch` sequences of up to `max_len` tokens.

        slack: spare slots for a rolling cache, so positions written ahead and then rolled back (rejected
        speculative drafts) never overwrote a position still inside the window."""
        cfg = self.config
        dtype = dtype or self.dtype
        rolling = cfg.sliding_window is not None and cfg.sliding_window + slack < max_len
        size = cfg.sliding_window + slack if rolling else max_len
        for layer in self.layers:
            cache = layer.self_attn.cache
            if (cache is None or cache.size != size or cache.k.shape[0] < batch or cache.k.dtype != dtype
                    or cache.rolling != rolling):
                layer.self_attn.cache = KVCache(batch, cfg.num_kv_heads, size, cfg.head_dim, dtype, rolling)
            else:
                cache.reset()
        self.cache_len = max_len
        # the kernel reads the cache in the queries' dtype: only where the two agree
        kernel = (dtype == self.dtype and dtype in (torch.float32, torch.bfloat16) and cfg.head_dim <= 256
                  and cache_attention.available())
        for layer in self.layers:
            layer.self_attn.cache_kernel = kernel
        if self.rope_cos is None or self.rope_cos.shape[0] < max_len:
            self.init_rope(max(max_len, cfg.max_seq_len))

    def use_caches(self, caches: list[KVCache]) -> None:
        """Point every layer at its cache from `caches` (a server switches between pooled rows and their views)."""
        for layer, cache in zip(self.layers, caches, strict=True):
            layer.self_attn.cache = cache

    def reset_cache(self) -> None:
        for layer in self.layers:
            if layer.self_attn.cache is not None:
                layer.self_attn.cache.reset()

    def forward(self, ids: torch.Tensor, start: int = 0, use_cache: bool = False,
                last_only: bool = False, hidden_only: bool = False, packed: Packed | None = None) -> torch.Tensor:
        """ids (B, T) at positions start..start+T-1 -> logits (B, T, V) (or (B, 1, V) with last_only).
        hidden_only: return the final-normed hidden states (B, T, C) instead; callers apply lm_head in chunks.
        packed: rows holding several sequences (see Packed; start 0, no cache): positions and visibility from it."""
        B, T = ids.shape
        end = start + T if packed is None else int(packed.positions.max()) + 1
        if packed is not None and (start or use_cache or packed.positions.shape != (B, T)):
            raise ValueError("packed rows start at 0, use no KV cache and give a position per token")
        if self.rope_cos is None or self.rope_cos.shape[0] < end:
            self.init_rope(max(end, self.config.max_seq_len))
        x = self.embed_tokens(ids)                                # (B, T, C)
        if packed is None:
            cos = self.rope_cos[start:start + T].to(x.dtype)     # (T, D), converted once for every layer
            sin = self.rope_sin[start:start + T].to(x.dtype)
        else:
            cos = self.rope_cos[packed.positions].to(x.dtype)    # (B, T, D)
            sin = self.rope_sin[packed.positions].to(x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, start, use_cache, packed)
        if last_only:
            x = x[:, -1:]
        return self.norm(x) if hidden_only else self.lm_head(self.norm(x))

    def _decode_hidden(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        cos = self.rope_cos.index_select(0, pos)  # (T, D)
        sin = self.rope_sin.index_select(0, pos)
        x = self.embed_tokens(tokens)             # (B, T, C)
        for layer in self.layers:
            x = layer.decode(x, cos, sin, pos)
        return x

    def decode_step(self, token: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """token (B, 1) at position pos ((1,) long tensor) -> next-token logits (B, V), fp32.

        Shapes never change between steps, so this is the function the fast path compiles."""
        return self.lm_head(self.norm(self._decode_hidden(token, pos)))[:, -1].float()

    def verify_step(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """tokens (B, T) at positions pos ((T,) consecutive) -> logits (B, T, V), fp32: decode_step for T tokens
        at once (speculative verification), through the same per-row code, compiled per T."""
        return self.lm_head(self.norm(self._decode_hidden(tokens, pos))).float()

    def batch_decode_step(self, tokens: torch.Tensor, rows: list[int], pos: list[int]) -> torch.Tensor:
        """Continuous batching: tokens (B, 1), sequence b in cache row rows[b] at position pos[b] (the layers'
        caches are the pooled ones, see use_caches) -> next-token logits (B, V), fp32."""
        pos_t, rows_t = torch.tensor(pos), torch.tensor(rows)
        if self.rope_cos is None or self.rope_cos.shape[0] <= max(pos):
            self.init_rope(max(max(pos) + 1, self.config.max_seq_len))
        x = self.embed_tokens(tokens)               # (B, 1, C)
        cos = self.rope_cos.index_select(0, pos_t).to(x.dtype)  # (B, D), converted once for every layer
        sin = self.rope_sin.index_select(0, pos_t).to(x.dtype)
        for layer in self.layers:
            x = layer.decode_rows(x, cos, sin, rows, pos, rows_t, pos_t)
        return self.lm_head(self.norm(x))[:, -1].float()
