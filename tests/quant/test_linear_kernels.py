"""QLinearPerGrp: packed int4/int8 kernels and the dequantized path against the float reference."""

from __future__ import annotations

import pytest
import torch

from edgellm.kernels import torch_lowbit as K
from edgellm.quant import QLinearPerGrp, quantize

from .conftest import rel_err

SHAPES = [(100, 576), (200, 1536), (72, 576)]  # N not a multiple of 64


def _layer(n: int, k: int, bits: int, group: int, bias: bool = False, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    qw = quantize(w, bits, group)
    b = torch.randn(n, generator=g) if bias else None
    return qw, QLinearPerGrp.from_quantized(qw, b, dtype=torch.bfloat16), b


@pytest.mark.parametrize("bits,backend", [(4, "int4"), (8, "int8")])
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("group", [32, 64, 128])
def test_kernel_matches_dequantized_reference(bits: int, backend: str, n: int, k: int, group: int,
                                              monkeypatch) -> None:
    if not (K.int4_available() if bits == 4 else K.int8_available()):
        pytest.skip(f"{backend} kernel not available in this torch build")
    qw, layer, _ = _layer(n, k, bits, group)
    assert layer.backend == backend
    ref_w = qw.dequantize()
    for limit in (10 ** 9, 0):   # every row count through the packed kernel, then through the dequantized path
        monkeypatch.setattr(QLinearPerGrp, "dequant_min_tokens", limit)
        for rows in (1, 5, 40):
            x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows)).to(torch.bfloat16)
            assert rel_err(layer(x), x.float() @ ref_w.T) < 1e-2


@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("group", [-1, 32, 128])
def test_odd_widths_are_padded_and_bias_and_batch_dims_work(bits: int, group: int) -> None:
    qw, layer, b = _layer(72, 100, bits, group, bias=True)   # K = 100: no kernel group divides it
    x = torch.randn(2, 3, 100).to(torch.bfloat16)
    ref = x.float() @ qw.dequantize().T + b
    out = layer(x)
    assert out.shape == (2, 3, 72) and out.dtype == torch.bfloat16
    assert rel_err(out, ref) < 1e-2
    exact = x.float() @ qw.dequantize().T + layer.bias.float()   # (the layer keeps its bias in bf16)
    assert rel_err(layer(x.float()), exact) < 1e-5              # fp32 inputs take the exact dense path


def test_to_quantized_is_bit_identical() -> None:
    for bits, group in ((4, 128), (3, 64), (8, 32), (4, -1)):
        qw, layer, _ = _layer(100, 576, bits, group)
        back = layer.to_quantized()
        assert torch.equal(back.q, qw.q) and torch.equal(back.scales, qw.scales) and torch.equal(back.zeros, qw.zeros)
        assert (back.bits, back.group_size) == (bits, group)


def test_fallbacks_when_kernels_are_missing_or_layout_unknown(monkeypatch) -> None:
    x = torch.randn(3, 576).to(torch.bfloat16)
    monkeypatch.setattr(K, "int4_available", lambda: False)
    monkeypatch.setattr(K, "int8_available", lambda: False)
    for bits in (4, 8):
        qw, layer, _ = _layer(100, 576, bits, 64)
        assert layer.backend == "dense"
        assert rel_err(layer(x), x.float() @ qw.dequantize().T) < 1e-2
        assert torch.equal(layer.to_quantized().q, qw.q)
    monkeypatch.undo()
    if not K.int4_available():
        pytest.skip("int4 kernel not available")
    monkeypatch.setattr(K, "int4_layout_ok", lambda: False)   # a future torch with another packed layout
    qw, layer, _ = _layer(100, 576, 4, 64)
    assert layer.backend == "int4" and hasattr(layer, "nibbles")
    assert torch.equal(layer.to_quantized().q, qw.q)
    big = torch.randn(64, 576).to(torch.bfloat16)
    assert rel_err(layer(big), big.float() @ qw.dequantize().T) < 1e-2


def test_repr_matches_the_seeds_model_dump() -> None:
    _, layer, _ = _layer(576, 576, 4, 128)
    assert repr(layer) == "QLinearPerGrp(in_features:576, out_features:576, bias:None, w_bit:4 group_size:128)"


def test_kernel_group_choice() -> None:
    assert K.kernel_group(128, 576) == 64 and K.kernel_group(-1, 576) == 64 and K.kernel_group(128, 1536) == 128
    assert K.kernel_group(16, 576) is None


def test_int4_layout_probe_and_chunked_packing() -> None:
    if not K.int4_available():
        pytest.skip("torch's int4 kernel is not available here")
    if not K.int4_layout_ok():
        # torch packs int4 per CPU capability (its AVX-512 layout is the one unpack_int4 reads); elsewhere the
        # layer keeps its own nibbles, which test_fallbacks_when_kernels_are_missing_or_layout_unknown covers.
        pytest.skip("torch packs int4 in another layout on this CPU path (not AVX-512)")
    q = torch.randint(0, 16, (K.PACK_ROWS + 128, 64), dtype=torch.uint8)
    assert torch.equal(K.unpack_int4(K.pack_int4(q), 64), q)
