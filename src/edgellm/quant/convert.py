"""Model surgery: which linears get quantized, and swapping them for `QLinearPerGrp` (real quantization)
or for their dequantized float weights (fake quantization, for evaluation)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn

from ..memory import TrimWhenGrown
from ..model import Transformer
from .linear import QLinearPerGrp
from .pergroup import QuantizedWeight, quantize
from .spec import QuantSpec

LAYER_LINEARS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")


class ScaledLinear(nn.Linear):
    """y = (x * input_scale) @ W.T: a linear whose input is rescaled per channel (AWQ+'s lm_head, whose
    scale cannot be folded into a preceding op). Quantizing it gives a QLinearPerGrp with the same
    input_scale; fake quantization folds the scale back into the dequantized weight."""

    def __init__(self, weight: torch.Tensor, input_scale: torch.Tensor) -> None:
        super().__init__(weight.shape[1], weight.shape[0], bias=False, device="meta")
        self.weight = nn.Parameter(weight, requires_grad=False)
        # A plain attribute, not a buffer: Module.to(bf16) must not round it before quantization reads it.
        self.input_scale = input_scale.float().clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x * self.input_scale.to(x.dtype))


def linear_names(model: Transformer, include_lm_head: bool) -> list[str]:
    names = [f"layers.{i}.{n}" for i in range(len(model.layers)) for n in LAYER_LINEARS]
    return names + (["lm_head"] if include_lm_head else [])


def get_module(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name)


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def lm_head_is_tied(model: Transformer) -> bool:
    head = model.lm_head
    return isinstance(head, nn.Linear) and head.weight is model.embed_tokens.weight


def rtn_weights(model: Transformer, spec: QuantSpec) -> Iterator[tuple[str, QuantizedWeight]]:
    """Round-to-nearest per-group codes for every linear the spec covers, from the current float weights.

    Lazy: each weight is read when its turn comes, so `install` can replace a layer before the next is
    rounded (the model plus one layer's fp32 scratch, never a second copy of the model)."""
    for name in linear_names(model, spec.quantize_lm_head):
        yield name, quantize(get_module(model, name).weight, spec.w_bit, spec.group_size, spec.sym)


def install_one(model: Transformer, name: str, qw: QuantizedWeight, dtype: torch.dtype, fake: bool = False,
                backend: str = "auto") -> None:
    """Replace linear `name` by its quantized form: a QLinearPerGrp, or (fake) an nn.Linear holding the
    dequantized weight. The bias is rounded through float16 first, as checkpoints store it.

    A quantized lm_head of a tied-embedding model gets its own weight; the embedding keeps the float one."""
    old = get_module(model, name)
    bias = old.bias.detach().to(torch.float16) if getattr(old, "bias", None) is not None else None
    in_scale = old.input_scale if isinstance(old, ScaledLinear) else None
    if fake:
        w = qw.dequantize()
        lin = nn.Linear(qw.in_features, qw.out_features, bias=bias is not None, device="meta")
        lin.weight = nn.Parameter((w if in_scale is None else w * in_scale[None, :]).to(dtype),
                                  requires_grad=False)
        if bias is not None:
            lin.bias = nn.Parameter(bias.to(dtype), requires_grad=False)
        set_module(model, name, lin)
    else:
        q = QLinearPerGrp.from_quantized(qw, bias, dtype=dtype, backend=backend)
        q.set_input_scale(in_scale)
        set_module(model, name, q)


def install(model: Transformer, weights: Iterable[tuple[str, QuantizedWeight]], dtype: torch.dtype,
            fake: bool = False, backend: str = "auto") -> None:
    """`install_one` for every (name, weight) pair, in order."""
    trim = TrimWhenGrown()
    for name, qw in weights:
        install_one(model, name, qw, dtype, fake, backend)
        trim()


def finish_floats(model: Transformer, dtype: torch.dtype, skip: tuple[str, ...] = ()) -> None:
    """Round the parameters that stay float (embedding, norms, biases of float linears) through float16 and
    cast them to `dtype`, leaving the modules named in `skip` (already quantized) untouched."""
    seen: set[int] = set()  # a tied embedding is also the float lm_head's weight: round it once
    for mname, module in model.named_modules():
        if mname in skip:
            continue
        for p in module.parameters(recurse=False):
            if p.is_floating_point() and id(p) not in seen:
                seen.add(id(p))
                p.data = round_through_fp16(p.data, dtype)


ROUND_CHUNK = 1 << 20  # elements converted at a time by round_through_fp16


def round_through_fp16(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t.to(float16).to(dtype), a chunk at a time (in place when t already has `dtype`): the default model's
    tied embedding is 57 MB in bf16, and the one-shot form held two more copies of it at once."""
    if not t.is_contiguous():
        return t.to(torch.float16).to(dtype)
    out = t if t.dtype == dtype else torch.empty_like(t, dtype=dtype)
    src, dst = t.view(-1), out.view(-1)
    for i in range(0, src.numel(), ROUND_CHUNK):
        dst[i:i + ROUND_CHUNK].copy_(src[i:i + ROUND_CHUNK].to(torch.float16))
    return out


def quantized_layers(model: nn.Module) -> dict[str, QLinearPerGrp]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QLinearPerGrp)}
