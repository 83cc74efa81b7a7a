"""CPU detection and the EDGELLM_ISA cap (kernels/cpu.py): facts derived from flags, never assumed."""

from __future__ import annotations

import pytest

from edgellm.kernels import cpu


def test_levels_follow_the_flags(monkeypatch):
    cpu.detected.cache_clear()
    monkeypatch.setattr(cpu, "cpu_flags", lambda: "flags : fpu sse2 avx2 fma f16c avx512f avx512bw avx512vl "
                                                  "avx512_vnni avx512_bf16")
    monkeypatch.setattr(cpu.platform, "machine", lambda: "x86_64")
    try:
        assert cpu.detected() == {"avx2", "avx512_vnni", "avx512_bf16"}
        monkeypatch.delenv("EDGELLM_ISA", raising=False)
        assert cpu.best() == "avx512_bf16" and cpu.native_bf16() and cpu.int8_dot_isa() == 2
        assert cpu.auto_dtype() == "bf16"
        monkeypatch.setenv("EDGELLM_ISA", "avx2")
        assert cpu.best() == "avx2" and not cpu.native_bf16() and cpu.int8_dot_isa() == 0
        assert cpu.auto_dtype() == "fp32"
        assert "forced by EDGELLM_ISA=avx2" in cpu.summary()
        assert "AVX2 maddubs" in cpu.paths()["4/8-bit decode"] and "AVX2 fp32" in cpu.paths()["prefill attention"]
        cpu.detected.cache_clear()
        monkeypatch.setattr(cpu, "cpu_flags", lambda: "flags : avx2 fma f16c avx_vnni")  # an Intel Core laptop
        monkeypatch.delenv("EDGELLM_ISA")
        assert cpu.detected() == {"avx2", "avx_vnni"} and cpu.int8_dot_isa() == 1 and cpu.auto_dtype() == "fp32"
        cpu.detected.cache_clear()
        monkeypatch.setattr(cpu, "cpu_flags", lambda: "flags : sse2 avx")               # no AVX2: torch paths
        assert cpu.best() == "none" and cpu.int8_dot_isa() is None
        assert cpu.paths()["4/8-bit decode"].startswith("torch")
        assert cpu.paths()["prefill attention"] == "torch (fp32)"
    finally:
        cpu.detected.cache_clear()


def test_unknown_isa_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("EDGELLM_ISA", "avx1024")
    with pytest.raises(ValueError, match="EDGELLM_ISA='avx1024' is not one of: native, none, avx2"):
        cpu.forced()


def test_this_machine_is_described():
    line = cpu.summary()
    assert "path" in line and cpu.cpu_name() in line
    assert set(cpu.paths()) == {"activations", "4/8-bit decode", "4/8-bit prefill", "decode step", "prefill attention"}
