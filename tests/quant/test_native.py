"""The C int4 dequantizer (quant/native.py + dequant_int4.c): exact values, the prefill path, fallbacks."""

from __future__ import annotations

import subprocess

import pytest
import torch

from edgellm.quant import QLinearPerGrp, native, quantize
from edgellm.quant import kernels as K

from .conftest import rel_err


@pytest.fixture
def dequant_t():
    if not (K.int4_available() and K.int4_layout_ok()):
        pytest.skip("no packed int4 layout in this torch")
    if native._compiler() is None:
        pytest.skip("no C compiler")
    f = native.int4_dequantizer()
    assert f is not None, native.reason  # a compiler is here: the kernel must build and pass its self-check
    return f


def _layer(n: int, k: int, bits: int, group: int, seed: int = 0) -> tuple:
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05
    qw = quantize(w, bits, group)
    return qw, QLinearPerGrp.from_quantized(qw, dtype=torch.bfloat16)


@pytest.mark.parametrize("bits,group", [(4, 32), (4, 64), (4, 128), (4, -1), (3, 64)])
@pytest.mark.parametrize("n,k", [(100, 576), (200, 1536), (72, 100), (64, 96)])
def test_matches_the_eager_dequantization_bit_for_bit(dequant_t, bits: int, group: int, n: int, k: int) -> None:
    qw, layer = _layer(n, k, bits, group)
    if layer.backend != "int4":
        pytest.skip("no int4 kernel group fits")
    g = k if group == -1 else group
    for n0, n1 in ((0, n), (64, n), (0, 64)):
        if n1 <= n0:
            continue
        got = dequant_t(layer.packed, layer.scales16, layer.zeros, k, layer.k_pad, n0, n1, g, layer.code_shift)
        assert got.shape == (k, n1 - n0) and got.dtype == torch.bfloat16
        assert torch.equal(got.t(), layer.dequantized_rows(n0, n1, torch.bfloat16))
        assert torch.equal(got.t(), qw.dequantize()[n0:n1].to(torch.bfloat16))


def test_same_result_with_one_thread(dequant_t) -> None:
    _, layer = _layer(300, 576, 4, 32)
    args = (layer.packed, layer.scales16, layer.zeros, 576, layer.k_pad, 0, 300, 32, 0)
    two = dequant_t(*args)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert torch.equal(dequant_t(*args), two)
    finally:
        torch.set_num_threads(threads)


def test_rejects_bad_requests(dequant_t) -> None:
    _, layer = _layer(100, 576, 4, 32)
    args = (layer.packed, layer.scales16, layer.zeros, 576, layer.k_pad)
    with pytest.raises(ValueError, match="rows 10:100"):
        dequant_t(*args, 10, 100, 32, 0)          # not on a 64-row block boundary
    with pytest.raises(ValueError, match="rows 0:200"):
        dequant_t(*args, 0, 200, 32, 0)           # past the last row
    with pytest.raises(ValueError, match="contiguous"):
        dequant_t(layer.packed, layer.scales16.float(), layer.zeros, 576, layer.k_pad, 0, 100, 32, 0)


def test_prefill_path_uses_it_and_agrees_with_eager(dequant_t, monkeypatch) -> None:
    qw, layer = _layer(200, 576, 4, 32)
    x = torch.randn(QLinearPerGrp.NATIVE_INT4_DENSE_FROM_ROWS, 576).to(torch.bfloat16)
    calls = []
    monkeypatch.setattr(native, "int4_dequantizer", lambda: lambda *a: calls.append(a) or dequant_t(*a))
    monkeypatch.setattr(layer, "_forward_int4", lambda x2: pytest.fail("48 rows should take the dense path"))
    fast = layer(x)
    assert calls, "the C dequantizer was not used"
    monkeypatch.setattr(native, "int4_dequantizer", lambda: None)   # eager torch dequantization instead
    monkeypatch.setattr(QLinearPerGrp, "dequant_min_tokens", 0)
    eager = layer(x)
    assert rel_err(fast, eager) < 1e-3
    assert rel_err(fast, x.float() @ qw.dequantize().T) < 1e-2
    assert layer(x.float()).dtype == torch.float32                  # fp32 inputs keep the exact eager path


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """An empty edgellm cache and no memoised build."""
    monkeypatch.setenv("EDGELLM_CACHE", str(tmp_path))
    native.int4_dequantizer.cache_clear()
    yield tmp_path
    native.int4_dequantizer.cache_clear()


def test_builds_once_then_reuses_the_cached_library(dequant_t, fresh, monkeypatch) -> None:
    assert native.int4_dequantizer() is not None
    assert len(list((fresh / "native").glob("dequant_int4-*.so"))) == 1
    native.int4_dequantizer.cache_clear()

    def no_compiler(*a, **k):
        raise AssertionError("recompiled although a built library was cached")

    monkeypatch.setattr(subprocess, "run", no_compiler)
    assert native.int4_dequantizer() is not None


def test_falls_back_with_a_reason(fresh, monkeypatch) -> None:
    if not (K.int4_available() and K.int4_layout_ok()):
        pytest.skip("no packed int4 layout in this torch")
    monkeypatch.setenv("EDGELLM_NATIVE", "0")
    assert native.int4_dequantizer() is None and native.reason == "EDGELLM_NATIVE=0"
    monkeypatch.delenv("EDGELLM_NATIVE")
    native.int4_dequantizer.cache_clear()
    monkeypatch.setattr(native, "_compiler", lambda: None)
    assert native.int4_dequantizer() is None and "no C compiler" in native.reason
    native.int4_dequantizer.cache_clear()
    monkeypatch.setattr(native, "_compiler", lambda: "/bin/false")   # a "compiler" that always fails
    assert native.int4_dequantizer() is None and "building the int4 dequantizer failed" in native.reason
    native.int4_dequantizer.cache_clear()
    monkeypatch.undo()
    monkeypatch.setenv("EDGELLM_CACHE", str(fresh))
    if native._compiler() is not None:
        monkeypatch.setattr(native, "_self_check", lambda f: False)  # a build that computes wrong values
        assert native.int4_dequantizer() is None and "disagreed" in native.reason
    # without the kernel the layer still works (eager dequantization)
    native.int4_dequantizer.cache_clear()
    monkeypatch.setattr(native, "_compiler", lambda: None)
    qw, layer = _layer(100, 576, 4, 32)
    x = torch.randn(200, 576).to(torch.bfloat16)
    assert rel_err(layer(x), x.float() @ qw.dequantize().T) < 1e-2
