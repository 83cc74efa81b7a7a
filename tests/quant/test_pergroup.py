"""The integer convention: codes, scales, zero points, regrouping, spec parsing and AutoAWQ packing."""

from __future__ import annotations

import pytest
import torch

from edgellm.errors import InvalidArgumentError
from edgellm.quant import QuantSpec, fake_quantize, pack_awq, parse_quant, quantize, unpack_awq
from edgellm.quant.checkpoint import AWQ_ORDER
from edgellm.quant.pergroup import expand_groups


@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("group", [32, 128, -1])
@pytest.mark.parametrize("sym", [False, True])
def test_codes_in_range_and_error_within_one_step(bits: int, group: int, sym: bool) -> None:
    w = torch.randn(40, 200, generator=torch.Generator().manual_seed(bits)) * 0.1  # 200: a short last group
    qw = quantize(w, bits, group, sym)
    assert qw.q.dtype == torch.uint8 and int(qw.q.max()) <= 2 ** bits - 1
    assert qw.scales.dtype == torch.float16 and qw.scales.shape == (40, 1 if group == -1 else -(-200 // group))
    if sym:
        assert bool((qw.zeros == 2 ** (bits - 1)).all()) and int(qw.q.min()) >= 1
    step = expand_groups(qw.scales.float(), group, 200)
    assert bool(((qw.dequantize() - w).abs() <= step * 0.5 + 1e-6).float().mean() > 0.99)
    assert bool(((qw.dequantize() - w).abs() <= step + 1e-6).all())
    assert torch.equal(fake_quantize(w, bits, group, sym), qw.dequantize())


def test_short_last_group_uses_only_its_own_columns() -> None:
    w = torch.randn(4, 100)
    w[:, 64:] = torch.linspace(1.0, 2.0, 36)  # last group of 64: 36 real, all positive columns
    qw = quantize(w, 4, 64)
    assert qw.scales.shape == (4, 2)
    # min <= 0 <= max is enforced, so the all-positive group spans [0, 2]: step 2/15
    assert torch.allclose(qw.scales[:, 1].float(), torch.full((4,), 2.0 / 15), rtol=1e-3)
    assert float((qw.dequantize()[:, 64:] - w[:, 64:]).abs().max()) <= 1 / 15 + 1e-3


def test_regroup_and_coarsen_are_exact() -> None:
    w = torch.randn(16, 576)
    qw = quantize(w, 4, 128)          # 576 = 4.5 groups of 128
    fine = qw.regroup(64)             # 9 groups of 64, each 128-group's parameters repeated
    assert fine.scales.shape == (16, 9)
    assert torch.equal(fine.dequantize(), qw.dequantize())
    back = fine.coarsen(128)
    assert back is not None and torch.equal(back.scales, qw.scales) and torch.equal(back.zeros, qw.zeros)
    assert quantize(w, 4, 64).coarsen(128) is None   # genuinely different groups do not merge
    per_channel = quantize(w, 4, -1)
    assert torch.equal(per_channel.regroup(32).dequantize(), per_channel.dequantize())


def test_split_and_cat_rows() -> None:
    qw = quantize(torch.randn(24, 64), 4, 32)
    parts = qw.split_rows([8, 8, 8])
    cat = type(qw).cat_rows(parts)
    assert torch.equal(cat.q, qw.q) and torch.equal(cat.scales, qw.scales)


def test_parse_quant() -> None:
    assert parse_quant("Q4_0") == QuantSpec("rtn", 4, -1, sym=True)
    assert parse_quant("q8_0") == QuantSpec("rtn", 8, -1, sym=True)
    assert parse_quant("awq:w4:g128") == QuantSpec("awq", 4, 128)
    assert parse_quant("pergrp:w3:g64:sym") == QuantSpec("rtn", 3, 64, sym=True)
    assert parse_quant("awqplus").label == "AWQ+ g128"
    assert QuantSpec("rtn", 4, 32).label == "w4 g32"
    assert QuantSpec("awq").quantize_lm_head is False and QuantSpec("awqplus").quantize_lm_head is True
    with pytest.raises(InvalidArgumentError):
        parse_quant("q4_k")
    with pytest.raises(InvalidArgumentError):
        QuantSpec("gptq")


def test_awq_nibble_order() -> None:
    codes = torch.arange(8, dtype=torch.uint8)[None]            # output columns 0..7 hold codes 0..7
    packed = int(pack_awq(codes)[0, 0]) & 0xFFFFFFFF
    nibbles = [(packed >> (4 * i)) & 0xF for i in range(8)]
    assert nibbles == list(AWQ_ORDER)                           # nibble i holds column AWQ_ORDER[i]
    big = torch.randint(0, 16, (5, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    big[:, 7] = 15                                              # sets the int32 sign bit
    assert torch.equal(unpack_awq(pack_awq(big)), big)


def test_quantize_in_row_chunks_equals_one_pass(monkeypatch) -> None:
    """quantize() rounds big weights a few rows at a time (bounded fp32 scratch): same codes as one pass."""
    from edgellm.quant import pergroup

    w = torch.randn(50, 200, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    whole = quantize(w, 4, 32)
    monkeypatch.setattr(pergroup, "QUANTIZE_ROWS", 7)
    parts = quantize(w, 4, 32)
    assert torch.equal(parts.q, whole.q) and torch.equal(parts.scales, whole.scales)
    assert torch.equal(parts.zeros, whole.zeros)


def test_round_through_fp16_is_the_two_casts_a_chunk_at_a_time(monkeypatch):
    from edgellm.quant import convert

    monkeypatch.setattr(convert, "ROUND_CHUNK", 1000)  # several chunks and a partial last one
    g = torch.Generator().manual_seed(0)
    for src in (torch.float32, torch.bfloat16, torch.float16):
        for dst in (torch.bfloat16, torch.float32):
            t = (torch.randn(37, 91, generator=g) * 3e4).to(src)      # some overflow float16 (inf)
            want = t.to(torch.float16).to(dst)
            got = convert.round_through_fp16(t.clone(), dst)
            assert got.dtype == dst and torch.equal(got, want)
    t = torch.randn(8, 6, generator=g).t()                             # not contiguous
    assert torch.equal(convert.round_through_fp16(t, torch.bfloat16), t.half().bfloat16())
