"""On the real default model: perplexity with the packed int4 kernels equals fake-quant perplexity."""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

import edgellm
from edgellm.quant import QLinearPerGrp, dataset_text, quantize_llm
from edgellm.quant.convert import quantized_layers, set_module


def windowed_perplexity(model: nn.Module, ids: torch.Tensor, seqlen: int, n_windows: int) -> float:
    """Non-overlapping windows from the start of `ids`; every window scored from its own first token."""
    nll, count = 0.0, 0
    with torch.inference_mode():
        for w in range(n_windows):
            chunk = ids[w * seqlen:(w + 1) * seqlen][None]
            logits = model(chunk)[0, :-1].float()
            nll += float(F.cross_entropy(logits, chunk[0, 1:], reduction="sum"))
            count += seqlen - 1
    return math.exp(nll / count)


def dequantized_copy(model: nn.Module) -> nn.Module:
    fake = copy.deepcopy(model)
    for name, m in quantized_layers(fake).items():
        lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, dtype=torch.bfloat16)
        lin.weight.data = m.dequantized_weight(torch.bfloat16)
        if m.bias is not None:
            lin.bias.data = m.bias.data.clone()
        set_module(fake, name, lin)
    return fake


def test_int4_kernel_perplexity_equals_fake_quant(default_gguf, data_dir, monkeypatch) -> None:
    # (int8 kernels are checked layer by layer in test_kernels; their per-group loop is slow at 128 rows.)
    llm = edgellm.load(default_gguf, dtype="bf16")
    quantize_llm(llm, "rtn:w4:g128")
    assert {m.backend for m in quantized_layers(llm.model).values()} == {"int4"}
    ids = torch.tensor(llm.tokenizer.encode(dataset_text("wikitext2", "test")[:30000]))
    windows = dict(seqlen=512, n_windows=8)  # 4k scored tokens: bf16 noise on fewer tokens nears the 0.5 % bound
    fake = windowed_perplexity(dequantized_copy(llm.model), ids, **windows)
    monkeypatch.setattr(QLinearPerGrp, "dequant_min_tokens", 0)          # the bf16 dequantized (prefill) path
    dense = windowed_perplexity(llm.model, ids, **windows)
    monkeypatch.setattr(QLinearPerGrp, "dequant_min_tokens", 10 ** 9)    # force the packed kernels
    kernel = windowed_perplexity(llm.model, ids, **windows)
    assert abs(kernel / fake - 1) < 0.005 and abs(dense / fake - 1) < 0.005, (fake, dense, kernel)
    assert 5 < fake < 200
