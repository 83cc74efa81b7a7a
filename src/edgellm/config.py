"""One config dataclass for every supported architecture, built from an HF config.json or GGUF metadata."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .errors import UnsupportedModelError

# HF `model_type` -> our family name. Mistral and Llama differ only in config (sliding window);
# Phi-3 stores fused qkv/gate_up; Qwen2 has q/k/v biases.
SUPPORTED_MODEL_TYPES = {"llama": "llama", "mistral": "mistral", "phi3": "phi3", "qwen2": "qwen2"}

# The seeds' `--rope_type` names -> rope_scaling dicts (Meta's published values).
ROPE_PRESETS: dict[str, dict[str, Any] | None] = {
    "simple": None,
    "llama3.1": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_position_embeddings": 8192},
    "llama3.2": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_position_embeddings": 8192},
}


@dataclass
class ModelConfig:
    arch: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    head_dim: int = 128
    max_seq_len: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    # llama.cpp stores llama3-style frequency factors as a tensor ("rope_freqs.weight"): inv_freq / factors.
    rope_freq_factors: list[float] | None = None
    sliding_window: int | None = None
    attention_bias: bool = False      # q/k/v biases (Qwen2)
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    name: str = ""

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def with_rope_type(self, rope_type: str) -> ModelConfig:
        """Override RoPE scaling with one of the seeds' presets: simple | llama3.1 | llama3.2."""
        if rope_type not in ROPE_PRESETS:
            raise UnsupportedModelError(f"unknown rope_type {rope_type!r}; choose from {sorted(ROPE_PRESETS)}")
        preset = ROPE_PRESETS[rope_type]
        self.rope_scaling = dict(preset) if preset else None
        self.rope_freq_factors = None
        return self

    # ---------------------------------------------------------------- builders
    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> ModelConfig:
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            archs = cfg.get("architectures") or []
            raise UnsupportedModelError(
                f"unsupported architecture model_type={model_type!r} {archs}; "
                f"supported: {', '.join(sorted(SUPPORTED_MODEL_TYPES))}"
            )
        hidden = cfg["hidden_size"]
        heads = cfg["num_attention_heads"]
        head_dim = cfg.get("head_dim") or hidden // heads
        rope = cfg.get("rope_scaling") or cfg.get("rope_parameters")
        theta = cfg.get("rope_theta")
        if isinstance(rope, dict):
            theta = theta or rope.get("rope_theta")
            rope = {k: v for k, v in rope.items() if k not in ("rope_theta", "partial_rotary_factor")}
            kind = rope.get("rope_type", rope.get("type", "default"))
            if kind == "default":
                rope = None
            elif kind not in ("llama3", "linear"):
                raise UnsupportedModelError(f"unsupported rope scaling type {kind!r} (supported: llama3, linear)")
            else:
                rope["rope_type"] = kind
        if (cfg.get("partial_rotary_factor") or 1.0) != 1.0:
            raise UnsupportedModelError("partial rotary embeddings are not supported")
        sliding = cfg.get("sliding_window") or None
        if model_type == "qwen2" and not cfg.get("use_sliding_window", False):
            sliding = None  # Qwen2 configs carry a window value but disable it by default
        eos = cfg.get("eos_token_id")
        return cls(
            arch=SUPPORTED_MODEL_TYPES[model_type],
            vocab_size=cfg["vocab_size"],
            hidden_size=hidden,
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            max_seq_len=cfg.get("max_position_embeddings", 4096),
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta or 10000.0),
            rope_scaling=rope,
            sliding_window=sliding,
            attention_bias=bool(cfg.get("attention_bias", model_type == "qwen2")),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=list(eos) if isinstance(eos, list) else ([eos] if eos is not None else []),
            name=cfg.get("_name_or_path", ""),
        )

    @classmethod
    def from_gguf(cls, meta: dict[str, Any], tensor_names: set[str]) -> ModelConfig:
        arch = meta.get("general.architecture")
        if arch not in ("llama", "qwen2", "phi3"):
            raise UnsupportedModelError(
                f"unsupported GGUF architecture {arch!r}; supported: llama (incl. Mistral), qwen2, phi3"
            )

        def get(key: str, default: Any = None) -> Any:
            return meta.get(f"{arch}.{key}", default)

        hidden = get("embedding_length")
        heads = get("attention.head_count")
        kv_heads = get("attention.head_count_kv", heads)
        head_dim = get("attention.key_length") or hidden // heads
        vocab = get("vocab_size") or len(meta.get("tokenizer.ggml.tokens", []))
        rope = None
        if get("rope.scaling.type") == "linear":
            rope = {"rope_type": "linear", "factor": float(get("rope.scaling.factor"))}
        eos = meta.get("tokenizer.ggml.eos_token_id")
        return cls(
            arch={"llama": "llama", "qwen2": "qwen2", "phi3": "phi3"}[arch],
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=get("feed_forward_length"),
            num_layers=get("block_count"),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            max_seq_len=get("context_length", 4096),
            rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(get("rope.freq_base", 10000.0)),
            rope_scaling=rope,
            sliding_window=get("attention.sliding_window") or None,  # llama.cpp writes 0 for "none"
            attention_bias=arch == "qwen2",
            tie_word_embeddings="output.weight" not in tensor_names,
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=[eos] if eos is not None else [],
            name=meta.get("general.name", ""),
        )


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse RoPE frequencies (fp32, shape (head_dim/2,)), with llama3 / linear scaling as HF computes them."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if cfg.rope_freq_factors is not None:
        return inv_freq / torch.tensor(cfg.rope_freq_factors, dtype=torch.float32)
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type")
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)
    return inv_freq
