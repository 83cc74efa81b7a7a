"""Test helper: turn a tiny HF checkpoint folder into a GGUF file the way llama.cpp does.

Mirrors llama.cpp's convert_hf_to_gguf.py (plus llama-quantize for the types convert cannot write):

* arch: llama for Llama *and* Mistral (MistralForCausalLM is converted by LlamaModel), qwen2, phi3;
* metadata: `{arch}.context_length/embedding_length/block_count/feed_forward_length/attention.head_count/
  head_count_kv/rope.freq_base/attention.layer_norm_rms_epsilon`, `attention.key_length/value_length` when
  config.json has head_dim, llama's `vocab_size` and `rope.dimension_count`; phi3's
  `rope.scaling.original_context_length` and `attention.sliding_window` (0 when the config has none: llama.cpp
  uses 0 to tell Phi-4 from Phi-3). LlamaModel writes no sliding window, so Mistral files carry none;
* llama3 RoPE: a `rope_freqs.weight` F32 tensor of per-frequency divisors (generate_extra_tensors);
* tokenizer: a gpt2-type vocabulary (`get_vocab_base` + `SpecialVocab`): tokens by id with `[PAD{i}]`/UNUSED
  fill-ins up to vocab_size, CONTROL for special added tokens, merges "a b", bos/eos/pad ids, add_bos_token,
  chat_template;
* tensors: token_embd, blk.N.{attn_norm,attn_q,attn_k,attn_v,attn_output,attn_qkv,ffn_norm,ffn_gate,ffn_up,
  ffn_down}, output_norm, output (omitted when embeddings are tied); q/k rows permuted for the llama arch
  (LlamaModel.permute); 1-D tensors stay F32; a 2-D tensor whose rows do not split into blocks of the
  requested type falls back to F16, as convert does on gguf.QuantError.

Weights are encoded with `gguf.quants.quantize` where the gguf package implements it (F16, BF16, Q8_0, Q4_0,
Q4_1, Q5_0, Q5_1); for the K-quants it cannot produce (Q2_K..Q6_K) we write random but valid blocks (random
bits, fp16 scales sized so values have std ~0.06): the file's dequantized values then *are* the model.

`reference_state_dict` reads a file back with gguf.GGUFReader + gguf.quants.dequantize (independent of edgellm)
and returns HF-named fp32 weights, q/k rows put back by an index permutation, for an HF reference model.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from safetensors.torch import load_file

Q = gguf.GGMLQuantizationType
LLAMA_CPP_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "phi3": "phi3"}
_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.qkv_proj.weight": "attn_qkv.weight",      # phi3
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.gate_up_proj.weight": "ffn_up.weight",          # phi3: [gate; up] in ffn_up
    "mlp.down_proj.weight": "ffn_down.weight",
}
# fp16 fields of K-quant blocks (byte offsets), which random blocks must hold sane values in.
_K_SCALE_FIELDS = {Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED = 1, 3, 4, 5


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """LlamaModel.permute from convert_hf_to_gguf.py (n_head already replaced by n_head_kv for k)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _permuted_rows(rows: int, n_head: int) -> np.ndarray:
    # Stored row i holds HF row perm[i]: permute the row indices themselves.
    return llama_cpp_permute(np.arange(rows), n_head)


def can_quantize(qtype: Q) -> bool:
    """Whether gguf.quants.quantize implements `qtype` (0.19: not the K-quants)."""
    try:
        gguf.quants.quantize(np.zeros((1, 256), dtype=np.float32), qtype)
    except NotImplementedError:
        return False
    return True


def random_k_blocks(rows: int, cols: int, qtype: Q, rng: np.random.Generator, std: float = 0.06) -> np.ndarray:
    """Valid `qtype` data for a (rows, cols) tensor: random bits, fp16 scales set so values have ~`std`."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    n = rows * cols // block
    blocks = rng.integers(0, 256, size=(n, size), dtype=np.uint8)
    fields = _K_SCALE_FIELDS[qtype]
    for f in fields:  # unit scales first, to measure the spread the random bits give
        blocks[:, f:f + 2] = np.full((n, 1), 1.0, dtype=np.float16).view(np.uint8)
    unit_std = float(gguf.quants.dequantize(blocks, qtype).std())
    scale = (std / unit_std * rng.uniform(0.5, 1.5, size=(n, 1))).astype(np.float16)  # dequant is linear in them
    for f in fields:
        blocks[:, f:f + 2] = scale.view(np.uint8)
    return blocks.reshape(rows, cols // block * size)


def encode(w: np.ndarray, qtype: Q, rng: np.random.Generator) -> tuple[np.ndarray, Q]:
    """(data for GGUFWriter.add_tensor, type written) for one fp32 weight."""
    if w.ndim < 2:
        return w.astype(np.float32), Q.F32
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if w.shape[-1] % block:
        qtype = Q.F16  # convert_hf_to_gguf.py: QuantError -> "falling back to F16"
    if qtype == Q.F32:
        return w.astype(np.float32), Q.F32
    if qtype == Q.F16:
        return w.astype(np.float16), Q.F16
    if qtype in _K_SCALE_FIELDS and not can_quantize(qtype):
        return random_k_blocks(w.shape[0], w.shape[1], qtype, rng), qtype
    return gguf.quants.quantize(w.astype(np.float32), qtype), qtype


def _rope_params(hp: dict[str, Any]) -> dict[str, Any]:
    return hp.get("rope_parameters") or hp.get("rope_scaling") or {}


def llama3_rope_factors(hp: dict[str, Any]) -> np.ndarray:
    """LlamaModel.generate_extra_tensors. llama.cpp reads original_max_position_embeddings from the top level
    of config.json (8192 if absent, right for real Llama 3.x); we take the rope dict's value first so the tiny
    checkpoint (32) stays the model HF runs."""
    rope = _rope_params(hp)
    base = rope.get("rope_theta", hp.get("rope_theta", 10000.0))
    dim = hp.get("head_dim") or hp["hidden_size"] // hp["num_attention_heads"]
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_len = rope.get("original_max_position_embeddings", hp.get("original_max_position_embeddings", 8192))
    low_wavelen, high_wavelen = old_len / low, old_len / high
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(1)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old_len / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32).numpy()


def _add_vocab(w: gguf.GGUFWriter, folder: Path, vocab_size: int, hp: dict[str, Any]) -> None:
    tj = json.loads((folder / "tokenizer.json").read_text())
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    added = {t["id"]: t for t in tj.get("added_tokens", [])}
    reverse = {i: t for t, i in tj["model"]["vocab"].items()}
    reverse.update({i: t["content"] for i, t in added.items()})
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(TOKEN_UNUSED)
        else:
            tokens.append(reverse[i])
            types.append(TOKEN_NORMAL if i not in added else
                         TOKEN_CONTROL if added[i]["special"] else TOKEN_USER_DEFINED)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")  # the plain GPT-2 split regex, which our byte-level tokenizer uses
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]])
    index = {t: i for i, t in reverse.items()}
    if cfg.get("bos_token") in index:
        w.add_bos_token_id(index[cfg["bos_token"]])
    if cfg.get("eos_token") in index:
        w.add_eos_token_id(index[cfg["eos_token"]])
    if hp.get("pad_token_id") is not None:
        w.add_pad_token_id(hp["pad_token_id"])
    if "add_bos_token" in cfg:
        w.add_add_bos_token(cfg["add_bos_token"])
    if cfg.get("chat_template"):
        w.add_chat_template(cfg["chat_template"])


def hf_to_gguf(folder: Path, out: Path, qtype: Q = Q.F32, seed: int = 0) -> Path:
    """Write `out` from the HF checkpoint in `folder`, every 2-D weight encoded as `qtype`."""
    hp = json.loads((folder / "config.json").read_text())
    arch = LLAMA_CPP_ARCH[hp["model_type"]]
    rope = _rope_params(hp)
    n_head, n_kv = hp["num_attention_heads"], hp.get("num_key_value_heads") or hp["num_attention_heads"]
    head_dim = hp.get("head_dim") or hp["hidden_size"] // n_head
    rng = np.random.default_rng(seed)

    w = gguf.GGUFWriter(str(out), arch)
    w.add_type("model")
    w.add_name(folder.name)
    w.add_block_count(hp["num_hidden_layers"])
    w.add_context_length(hp["max_position_embeddings"])
    w.add_embedding_length(hp["hidden_size"])
    w.add_feed_forward_length(hp["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_freq_base(float(rope.get("rope_theta", hp.get("rope_theta", 10000.0))))
    w.add_layer_norm_rms_eps(hp["rms_norm_eps"])
    if hp.get("head_dim") is not None:
        w.add_key_length(hp["head_dim"])
        w.add_value_length(hp["head_dim"])
    if arch == "llama":
        w.add_vocab_size(hp["vocab_size"])
        w.add_rope_dimension_count(head_dim)
    if arch == "phi3":
        w.add_rope_dimension_count(head_dim)
        w.add_rope_scaling_orig_ctx_len(hp["original_max_position_embeddings"])
        w.add_sliding_window(hp.get("sliding_window") or 0)
    w.add_file_type({Q.F32: 0, Q.F16: 1}.get(qtype, 7))  # LlamaFileType; informational only
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_vocab(w, folder, hp["vocab_size"], hp)

    if arch == "llama" and rope.get("rope_type") == "llama3":
        w.add_tensor("rope_freqs.weight", llama3_rope_factors(hp))
    state = load_file(str(folder / "model.safetensors"))
    tied = hp.get("tie_word_embeddings", False)
    for name, t in state.items():
        if tied and name == "lm_head.weight":
            continue
        if name in _GLOBAL:
            gname = _GLOBAL[name]
        else:
            _, _, layer, rest = name.split(".", 3)  # model.layers.N.rest
            gname = f"blk.{layer}.{_LAYER[rest]}"
        a = t.float().numpy()
        if arch == "llama" and (".attn_q." in gname or ".attn_k." in gname):
            a = llama_cpp_permute(a, n_head if ".attn_q." in gname else n_kv)
        data, written = encode(a, qtype, rng)
        w.add_tensor(gname, data, raw_dtype=written)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def reference_state_dict(path: Path, hf_config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """HF-named fp32 weights of a GGUF file, read with the gguf package only (not edgellm)."""
    reader = gguf.GGUFReader(str(path))
    arch = LLAMA_CPP_ARCH[hf_config["model_type"]]
    n_head = hf_config["num_attention_heads"]
    n_kv = hf_config.get("num_key_value_heads") or n_head
    to_hf = {g: h for h, g in _GLOBAL.items()}
    layer_to_hf = {g: h for h, g in _LAYER.items()}
    # ffn_up is HF's up_proj, except in phi3 where it holds the fused gate_up_proj.
    layer_to_hf["ffn_up.weight"] = "mlp.gate_up_proj.weight" if arch == "phi3" else "mlp.up_proj.weight"
    out: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":
            continue
        values = np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        values = values.reshape(tuple(reversed(t.shape.tolist())))
        if t.name.startswith("blk."):
            _, layer, rest = t.name.split(".", 2)
            hf = f"model.layers.{layer}.{layer_to_hf[rest]}"
        else:
            hf = to_hf[t.name]
        if arch == "llama" and (".attn_q." in t.name or ".attn_k." in t.name):
            heads = n_head if ".attn_q." in t.name else n_kv
            hf_rows = np.empty_like(values)
            hf_rows[_permuted_rows(values.shape[0], heads)] = values  # stored row i is HF row perm[i]
            values = hf_rows
        out[hf] = torch.from_numpy(values)
    if hf_config.get("tie_word_embeddings"):
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    return out

