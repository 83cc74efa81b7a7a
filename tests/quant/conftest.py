"""Fixtures for the quantization tests: tiny random-weight checkpoints (built once per session) and helpers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import TINY_BASE, TINY_CONFIGS, make_hf_checkpoint


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """HF folders for llama (untied, GQA), llama3_rope (tied), qwen2 (q/k/v bias, tied) and phi3 (fused)."""
    root = tmp_path_factory.mktemp("quant_tiny")
    return {name: make_hf_checkpoint(name, root / name, seed=i) for i, name in
            enumerate(("llama", "llama3_rope", "qwen2", "phi3"))}


@pytest.fixture(scope="session")
def tiny_mha(tmp_path_factory) -> Path:
    """A llama without GQA (kv heads == heads), so AWQ's v -> o_proj group applies."""
    TINY_CONFIGS["llama_mha"] = dict(TINY_CONFIGS["llama"], num_key_value_heads=TINY_BASE["num_attention_heads"])
    try:
        return make_hf_checkpoint("llama_mha", tmp_path_factory.mktemp("quant_mha") / "llama_mha", seed=7)
    finally:
        del TINY_CONFIGS["llama_mha"]


@pytest.fixture(scope="session")
def tiny_wide(tmp_path_factory) -> Path:
    """A llama whose every in_features (64, 128) is a multiple of 32/64: all layers fit the AutoAWQ layout."""
    TINY_CONFIGS["llama_wide"] = dict(TINY_CONFIGS["llama"], intermediate_size=128)
    try:
        return make_hf_checkpoint("llama_wide", tmp_path_factory.mktemp("quant_wide") / "llama_wide", seed=3)
    finally:
        del TINY_CONFIGS["llama_wide"]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp(min=1e-12))


def random_ids(vocab: int = 320, n: int = 2, t: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, vocab, (n, t), generator=torch.Generator().manual_seed(seed))
