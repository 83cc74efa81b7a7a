"""Load a llama.cpp GGUF file: config and tokenizer from metadata, weights dequantized tensor by tensor."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from ..config import ModelConfig
from ..errors import CorruptCheckpointError, UnsupportedModelError
from .gguf_meta import open_gguf, read_metadata

# Weight types we read (all dequantized by the gguf package's reference code).
SUPPORTED_TYPES = {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K",
                   "Q5_K", "Q6_K"}

_GLOBAL_NAMES = {
    "token_embd.weight": "embed_tokens.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_qkv.weight": "self_attn.qkv_proj.weight",   # phi3: already fused
    "ffn_down.weight": "mlp.down_proj.weight",
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(.+)")


def unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation.

    convert_hf_to_gguf.py reorders each head's rows from HF's half-split RoPE layout (x[:D/2], x[D/2:])
    to GGML's interleaved pairs (x0, x1), (x2, x3)...: reshape(H, 2, D/2).swapaxes(1, 2). We apply the
    inverse so the model can keep HF's rotate_half convention.
    """
    shape = w.shape
    return w.reshape(n_heads, shape[0] // n_heads // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _dequantize(t: Any) -> np.ndarray:
    qtype = gguf.GGMLQuantizationType(t.tensor_type)
    if qtype.name not in SUPPORTED_TYPES:
        raise UnsupportedModelError(f"GGUF tensor {t.name} has unsupported type {qtype.name}")
    expected = int(t.n_bytes)
    if t.data.nbytes != expected:
        raise CorruptCheckpointError(f"GGUF tensor {t.name}: {t.data.nbytes} bytes, expected {expected}")
    if qtype.name == "F32":
        arr = np.asarray(t.data)
    else:
        arr = gguf.quants.dequantize(t.data, qtype)
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # GGML lists ne0 (columns) first
    return arr.reshape(shape)


class GGUFCheckpoint:
    """An opened GGUF file: `.config`, `.metadata`, and `tensors(dtype)` yielding our state-dict entries."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.reader = open_gguf(self.path)
        self.metadata = read_metadata(self.reader)
        self.raw = {t.name: t for t in self.reader.tensors}
        try:
            self.config = ModelConfig.from_gguf(self.metadata, set(self.raw))
        except (KeyError, TypeError) as e:
            raise CorruptCheckpointError(f"{self.path}: GGUF metadata is missing a model field ({e})") from e
        if "rope_freqs.weight" in self.raw:
            self.config.rope_freq_factors = _dequantize(self.raw["rope_freqs.weight"]).astype(float).tolist()

    def _get(self, name: str) -> torch.Tensor:
        if name not in self.raw:
            raise CorruptCheckpointError(f"{self.path}: tensor {name!r} is missing")
        arr = np.ascontiguousarray(_dequantize(self.raw[name]), dtype=np.float32)
        if not arr.flags.writeable:  # F32 tensors come straight from the read-only memmap
            arr = arr.copy()
        return torch.from_numpy(arr)

    def tensors(self, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
        cfg = self.config
        permute = cfg.arch == "llama"  # llama.cpp permutes q/k only for LLAMA-arch (incl. Mistral) files
        for src, dst in _GLOBAL_NAMES.items():
            if src in self.raw:
                yield dst, self._get(src).to(dtype)
        for i in range(cfg.num_layers):
            p = f"blk.{i}."
            for src, dst in _LAYER_NAMES.items():
                if p + src in self.raw:
                    yield f"layers.{i}.{dst}", self._get(p + src).to(dtype)
            if p + "attn_q.weight" in self.raw:
                q, k = self._get(p + "attn_q.weight"), self._get(p + "attn_k.weight")
                if permute:
                    q, k = unpermute_qk(q, cfg.num_heads), unpermute_qk(k, cfg.num_kv_heads)
                v = self._get(p + "attn_v.weight")
                yield f"layers.{i}.self_attn.qkv_proj.weight", torch.cat([q, k, v]).to(dtype)
                if cfg.attention_bias:
                    qb, kb = self._get(p + "attn_q.bias"), self._get(p + "attn_k.bias")
                    if permute:
                        qb, kb = unpermute_qk(qb, cfg.num_heads), unpermute_qk(kb, cfg.num_kv_heads)
                    vb = self._get(p + "attn_v.bias")
                    yield f"layers.{i}.self_attn.qkv_proj.bias", torch.cat([qb, kb, vb]).to(dtype)
            elif cfg.attention_bias and p + "attn_qkv.bias" in self.raw:
                yield f"layers.{i}.self_attn.qkv_proj.bias", self._get(p + "attn_qkv.bias").to(dtype)
            if p + "ffn_gate.weight" in self.raw:
                gate, up = self._get(p + "ffn_gate.weight"), self._get(p + "ffn_up.weight")
                yield f"layers.{i}.mlp.gate_up_proj.weight", torch.cat([gate, up]).to(dtype)
            else:  # phi3 stores [gate; up] fused in ffn_up
                yield f"layers.{i}.mlp.gate_up_proj.weight", self._get(p + "ffn_up.weight").to(dtype)
        known = set(_GLOBAL_NAMES) | {"rope_freqs.weight"}
        for name in self.raw:
            m = _LAYER_RE.match(name)
            if name not in known and not (m and int(m.group(1)) < cfg.num_layers):
                raise UnsupportedModelError(f"{self.path}: unexpected tensor {name!r} for {cfg.arch}")
