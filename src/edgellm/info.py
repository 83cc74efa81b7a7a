"""`edgellm info`: module tree, parameter counts per part, and a memory table for any config."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .config import ModelConfig
from .model import Transformer
from .report import markdown_table

# Bytes per weight for each storage precision (int4 packs two weights per byte; group scales ignored,
# as in the seeds' table).
PRECISION_BYTES = {"fp32": 4.0, "bf16": 2.0, "fp8": 1.0, "int8": 1.0, "int4": 0.5}
GB = 1e9


def meta_model(config: ModelConfig) -> Transformer:
    """The module tree without allocating weights."""
    from .loading import meta_transformer

    model = meta_transformer(config)
    model.tie_weights()
    return model


@dataclass
class ParamCounts:
    embedding: int
    attention: int
    mlp: int
    norms: int
    lm_head: int  # 0 when tied to the embedding

    @property
    def total(self) -> int:
        return self.embedding + self.attention + self.mlp + self.norms + self.lm_head


def count_parameters(config: ModelConfig) -> ParamCounts:
    c = config
    attn = c.hidden_size * (c.q_size + 2 * c.kv_size) + c.q_size * c.hidden_size
    if c.attention_bias:
        attn += c.q_size + 2 * c.kv_size
    mlp = 3 * c.hidden_size * c.intermediate_size
    norms = (2 * c.num_layers + 1) * c.hidden_size
    emb = c.vocab_size * c.hidden_size
    return ParamCounts(emb, attn * c.num_layers, mlp * c.num_layers, norms,
                       0 if c.tie_word_embeddings else emb)


def kv_cache_bytes(config: ModelConfig, context: int, bytes_per_value: float = 2.0) -> float:
    """Keys and values for every layer at `context` tokens (a rolling window caps Mistral's cache)."""
    tokens = min(context, config.sliding_window) if config.sliding_window else context
    return 2 * config.num_layers * config.kv_size * tokens * bytes_per_value


def size_class_billions(params: int) -> int | None:
    """The size in a model's name ("8B", "70B", "405B"): whole billions, truncated. None below 1B."""
    return int(params // 10**9) if params >= 10**9 else None


def memory_rows(config: ModelConfig, context: int) -> list[list]:
    params = count_parameters(config).total
    size_class = size_class_billions(params)
    kv = kv_cache_bytes(config, context) / GB
    rows = []
    for name, nbytes in PRECISION_BYTES.items():
        exact = params * nbytes / GB
        # The seeds' table (8B -> 16 GB in FP16) multiplies the nominal size by bytes/weight, rounded half up.
        nominal = math.floor(size_class * nbytes + 0.5) if size_class else round(exact, 3)
        rows.append([name, nbytes, round(exact, 3), nominal, round(kv, 3), round(exact + kv, 3)])
    return rows


def info_report(config: ModelConfig, context: int, model: torch.nn.Module | None = None) -> str:
    model = model if model is not None else meta_model(config)
    counts = count_parameters(config)
    lines = [str(model), ""]
    part_rows = [[k, v, f"{100 * v / counts.total:.1f}%"] for k, v in
                 (("embedding", counts.embedding), ("attention", counts.attention), ("mlp", counts.mlp),
                  ("norms", counts.norms), ("lm_head", counts.lm_head)) if v or k != "lm_head"]
    part_rows.append(["total", counts.total, "100.0%"])
    if config.tie_word_embeddings:
        part_rows.insert(-1, ["lm_head (tied to embedding)", 0, "0.0%"])
    lines += [f"Parameters: {counts.total:,} ({config.arch}, {config.num_layers} layers, hidden {config.hidden_size}, "
              f"heads {config.num_heads}/{config.num_kv_heads} q/kv, vocab {config.vocab_size})", "",
              markdown_table(["Part", "Parameters", "Share"], part_rows), ""]
    size_class = size_class_billions(counts.total)
    lines += [f"Inference memory (weights; KV cache in bf16 at context {context}"
              + (f"; nominal = {size_class}B x bytes/weight as in the seeds" if size_class else "") + ")", "",
              markdown_table(["Precision", "Bytes/weight", "Weights (GB)", "Nominal (GB)",
                              f"KV cache @{context} (GB)", "Total (GB)"], memory_rows(config, context))]
    return "\n".join(lines)


def training_report(config: ModelConfig, methods: list[str], seqlen: int, batch: int, r: int = 16) -> str:
    """The training-memory table (edgellm/finetune/memory.py): bf16 compute where the CPU has it, as training."""
    from .finetune.memory import training_rows
    from .kernels import cpu

    b = 2 if cpu.auto_dtype() == "bf16" else 4
    rows = training_rows(config, seqlen, batch, r, compute_bytes=b, methods=tuple(dict.fromkeys(methods)))
    head = (f"Training memory (GB; batch {batch} x {seqlen} tokens, LoRA r {r} on q,k,v,o, AdamW; frozen weights "
            f"and activations in {'bf16' if b == 2 else 'fp32'}; full = fp32 weights + grads + 2 moments = 16 B/param)")
    head += ("\nWorkspace: backward transients and freed temporaries the allocator keeps; Runtime: the process "
             "beyond its tensors. Total: estimated peak RSS above the Python + torch runtime.")
    return head + "\n\n" + markdown_table(["Method", "Weights", "Gradients", "Optimizer", "Activations", "Workspace",
                                           "Runtime", "Total"], rows)
