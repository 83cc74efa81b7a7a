"""The training-memory calculator (`edgellm info --train full|lora|qlora --seqlen N --batch B`).

The training counterpart of the seeds' inference table: weights, gradients, optimizer states and activations.
- full: fp32 weights (4 B), fp32 gradients (4 B) and AdamW's two moments (8 B): the published 16 bytes/parameter.
- lora: frozen weights in the compute dtype; LoRA weights, gradients and moments in fp32 (16 B per LoRA parameter).
- qlora: frozen linears in 4-bit blocks (Q4_1: 5 bits per weight with its scale and minimum), the rest as lora.
Activations are what autograd keeps for backward in edgellm's training forward (per token and layer, counted
tensor by tensor in `activation_bytes_per_token`, for the fused training ops of kernels/train_ops.py: where those
cannot be built, eager torch keeps more), plus one chunk of the chunked cross-entropy.

Two more rows make the total a resident-memory estimate rather than a tensor count (measured with
scripts/bench_finetune.py on the default model; docs/FINETUNING.md has the numbers):
- workspace: backward's transient gradients and the forward temporaries that glibc's allocator keeps after they
  are freed, WORKSPACE_FRACTION of the activations. Measured ~0.6-1.1x at 512, 1,024 and 2,048 tokens per step
  since the fused training ops keep less (the transient gradients did not shrink with them; 0.3-0.45x before);
  returning freed memory at once instead costs ~30 % of the training speed, so the runtime keeps it.
- runtime: what a training process holds beyond its tensors once the model is loaded (tokenizer, autograd and
  thread-pool state, module objects): RUNTIME_BYTES, measured ~0.13-0.14 GB for the default model.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import ModelConfig
from ..info import GB, count_parameters
from ..model import ATTN_BLOCK_WIDE, blocked_training_attention

METHODS = ("full", "lora", "qlora")
QLORA_BITS = 5.0        # Q4_1 / int4 g32 with fp16 scale + minimum per 32 weights
CE_CHUNK_BYTES = (1 << 23) * 4  # one chunk of logits, its gradient written over it (finetune/train.py)
WORKSPACE_FRACTION = 0.6  # backward transients + allocator-kept temporaries, per byte of activations (measured)
RUNTIME_BYTES = 0.15e9     # the training process beyond its tensors (measured on the default model)


@dataclass
class TrainingMemory:
    method: str
    weights: float
    gradients: float
    optimizer: float
    activations: float

    @property
    def workspace(self) -> float:
        return WORKSPACE_FRACTION * self.activations

    @property
    def total(self) -> float:
        """Estimated peak resident memory above the Python + torch runtime."""
        return self.weights + self.gradients + self.optimizer + self.activations + self.workspace + RUNTIME_BYTES


def lora_parameters(config: ModelConfig, r: int = 16, targets: tuple[str, ...] = ("q", "k", "v", "o")) -> int:
    c = config
    dims = {"q": (c.hidden_size, c.q_size), "k": (c.hidden_size, c.kv_size), "v": (c.hidden_size, c.kv_size),
            "o": (c.q_size, c.hidden_size), "gate": (c.hidden_size, c.intermediate_size),
            "up": (c.hidden_size, c.intermediate_size), "down": (c.intermediate_size, c.hidden_size)}
    return c.num_layers * sum(r * (dims[t][0] + dims[t][1]) for t in targets)


def activation_bytes_per_token(config: ModelConfig, b: int, targets: tuple[str, ...], lora: bool,
                               grad_checkpoint: bool = False, seqlen: int = 0, batch: int = 1) -> float:
    """Bytes autograd keeps per token for one decoder layer (b: bytes per activation value; seqlen and batch: the
    training shape, which decides the half-precision attention path and its saved probabilities)."""
    c = config
    C, q, kv, inter, H = c.hidden_size, c.q_size, c.kv_size, c.intermediate_size, c.num_heads
    if grad_checkpoint:
        return b * C  # the layer input only; one layer's full set is recomputed at a time
    # the fused training ops (kernels/train_ops.py) keep: each RMSNorm its input; the RoPE'd q, k and v (one
    # tensor); the SiLU-gate its gate_up input; LoRA's dropout nothing (its mask is recomputed in backward)
    norms = 2 * b * C
    attn = b * (q + 2 * kv)
    if b == 4 or not blocked_training_attention(batch, H, seqlen, b):
        attn += b * q + 4 * H                           # SDPA's output and log-sum-exp
    else:  # half precision: model.blocked_causal_attention keeps each block's probabilities over the keys it sees
        # (a query at position t of a block of `ATTN_BLOCK_WIDE` rows: up to the block's end)
        attn += b * H * (seqlen + ATTN_BLOCK_WIDE) / 2
    mlp = 2 * b * inter                                 # gate_up out (silu(gate) * up is recomputed)
    extra = 0.0
    if lora:  # the dropout output of each adapted input, kept by its A product (+ the rank-r intermediate)
        ins = {"q": C, "k": C, "v": C, "o": q, "gate": C, "up": C, "down": inter}
        seen = set()
        for t in targets:
            key = "qkv" if t in "qkv" else ("gu" if t in ("gate", "up") else t)
            if key not in seen:
                seen.add(key)
                extra += b * ins[t]
    return norms + attn + mlp + extra


def training_memory(config: ModelConfig, method: str, seqlen: int, batch: int, r: int = 16,
                    targets: tuple[str, ...] = ("q", "k", "v", "o"), compute_bytes: int = 2,
                    grad_checkpoint: bool = False) -> TrainingMemory:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}")
    counts = count_parameters(config)
    P = counts.total
    tokens = seqlen * batch
    layers = config.num_layers
    per_tok = activation_bytes_per_token(config, 4 if method == "full" else compute_bytes, targets,
                                         method != "full", grad_checkpoint, seqlen, batch)
    acts = tokens * layers * per_tok + tokens * config.hidden_size * 4 + CE_CHUNK_BYTES
    if grad_checkpoint:
        acts += tokens * activation_bytes_per_token(config, compute_bytes, targets, method != "full",
                                                    seqlen=seqlen, batch=batch)
    if method == "full":
        return TrainingMemory(method, 4 * P, 4 * P, 8 * P, acts)
    L = lora_parameters(config, r, targets)
    if method == "lora":
        base = P * compute_bytes
    else:
        linears = counts.attention + counts.mlp
        base = linears * QLORA_BITS / 8 + (P - linears) * compute_bytes
    return TrainingMemory(method, base + 4 * L, 4 * L, 8 * L, acts)


def training_rows(config: ModelConfig, seqlen: int, batch: int, r: int = 16, compute_bytes: int = 2,
                  methods: tuple[str, ...] = METHODS) -> list[list]:
    rows = []
    for m in methods:
        t = training_memory(config, m, seqlen, batch, r, compute_bytes=compute_bytes)
        rows.append([m, round(t.weights / GB, 3), round(t.gradients / GB, 3), round(t.optimizer / GB, 3),
                     round(t.activations / GB, 3), round(t.workspace / GB, 3), round(RUNTIME_BYTES / GB, 3),
                     round(t.total / GB, 3)])
    return rows
