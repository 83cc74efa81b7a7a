"""Session fixtures for the evaluation tests: the default model in fp32 and bf16, and the transformers
reference of the same GGUF (fp32)."""

from __future__ import annotations

import pytest
import torch

import edgellm


@pytest.fixture(scope="session")
def llm_fp32():
    return edgellm.load(dtype="fp32")


@pytest.fixture(scope="session")
def llm_bf16():
    return edgellm.load(dtype="bf16")


@pytest.fixture(scope="session")
def hf_ref(default_gguf):
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(default_gguf.parent), gguf_file=default_gguf.name, dtype=torch.float32)
    return model.eval()
