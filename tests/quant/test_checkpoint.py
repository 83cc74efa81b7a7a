"""AutoAWQ-gemm checkpoints: round trips, odd widths, sidecar layers, and other tools' files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import edgellm
from edgellm.errors import CorruptCheckpointError
from edgellm.quant import (
    QLinearPerGrp,
    QuantSpec,
    describe_model,
    is_quantized_folder,
    load_quantized_model,
    quantize_llm,
    save_quantized,
)
from edgellm.quant.checkpoint import SIDECAR
from edgellm.quant.convert import quantized_layers
from edgellm.tokenizer import Tokenizer

from .conftest import random_ids, rel_err

# ------------------------------------------------------------------ AutoAWQ's published packing, verbatim logic
AWQ_PACK_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]
AWQ_REVERSE_ORDER = [0, 4, 1, 5, 2, 6, 3, 7]


def autoawq_pack(intweight: torch.Tensor) -> torch.Tensor:
    """WQLinear_GEMM.from_linear's loop: int32 (rows, cols) codes -> int32 (rows, cols/8)."""
    intweight = intweight.to(torch.int32)
    packed = torch.zeros((intweight.shape[0], intweight.shape[1] // 8), dtype=torch.int32)
    for col in range(intweight.shape[1] // 8):
        for i in range(8):
            packed[:, col] |= intweight[:, col * 8 + AWQ_PACK_ORDER[i]] << (i * 4)
    return packed


def autoawq_dequantize(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group: int) -> torch.Tensor:
    """awq.utils.packing_utils.dequantize_gemm: -> float (in, out)."""
    shifts = torch.arange(0, 32, 4)
    iw = torch.bitwise_right_shift(qweight[:, :, None], shifts[None, None, :]).to(torch.int8).view(qweight.shape[0], -1)
    iz = torch.bitwise_right_shift(qzeros[:, :, None], shifts[None, None, :]).to(torch.int8).view(qzeros.shape[0], -1)
    order = torch.arange(iw.shape[-1]).view(-1, 8)[:, AWQ_REVERSE_ORDER].view(-1)
    iw, iz = iw[:, order] & 0xF, iz[:, order] & 0xF
    return (iw.float() - iz.float().repeat_interleave(group, 0)) * scales.float().repeat_interleave(group, 0)


def _reload(out: Path, dtype: torch.dtype = torch.bfloat16):
    model, config = load_quantized_model(out, dtype)
    return SimpleNamespace(model=model, config=config, tokenizer=Tokenizer.from_hf_folder(out),
                           loaded=SimpleNamespace(path=out, source=str(out)))


def _quantized(folder: Path, spec: QuantSpec):
    llm = edgellm.load(folder, dtype="fp32")
    quantize_llm(llm, spec, dtype=torch.bfloat16)
    return llm


def _same_codes(a, b) -> None:
    qa, qb = quantized_layers(a), quantized_layers(b)
    assert qa.keys() == qb.keys() and qa
    for name in qa:
        x, y = qa[name].to_quantized(), qb[name].to_quantized()
        assert torch.equal(x.q, y.q) and torch.equal(x.scales, y.scales) and torch.equal(x.zeros, y.zeros), name
        assert (x.bits, x.group_size, x.sym) == (y.bits, y.group_size, y.sym), name


# ------------------------------------------------------------------ round trips
def test_round_trip_all_awq_layout(tiny_wide: Path, tmp_path: Path) -> None:
    llm = _quantized(tiny_wide, QuantSpec("rtn", 4, 64))
    ids = random_ids()
    before = llm.model(ids)
    report = save_quantized(llm, tmp_path / "q")
    assert report.awq_layers == 8 and report.sidecar_layers == ["lm_head"]
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc == {"quant_method": "awq", "bits": 4, "group_size": 64, "zero_point": True, "version": "gemm",
                  "modules_to_not_convert": ["lm_head"]}
    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.layers.0.self_attn.k_proj.qweight").shape == (64, 32 // 8)
        assert f.get_tensor("model.layers.0.mlp.down_proj.qzeros").shape == (128 // 64, 64 // 8)
        sc = f.get_tensor("model.layers.0.mlp.down_proj.scales")
        assert sc.shape == (2, 64) and sc.dtype == torch.float16
    index = json.loads((tmp_path / "q" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {"model.safetensors"}   # other tools never see the sidecar
    again = _reload(tmp_path / "q")
    _same_codes(llm.model, again.model)
    assert torch.equal(again.model(ids), before)
    save_quantized(again, tmp_path / "q2")                  # save(load(save(x))) == save(x), tensor by tensor
    for name in ("model.safetensors", SIDECAR):
        with safe_open(str(tmp_path / "q" / name), "pt") as f1, safe_open(str(tmp_path / "q2" / name), "pt") as f2:
            assert set(f1.keys()) == set(f2.keys())
            for k in f1.keys():
                assert torch.equal(f1.get_tensor(k), f2.get_tensor(k)), k


@pytest.mark.parametrize("spec", [QuantSpec("rtn", 4, 128), QuantSpec("rtn", 3, 32, sym=True),
                                  QuantSpec("rtn", 8, -1, sym=True)], ids=lambda s: s.label)
def test_round_trip_odd_widths_3bit_and_8bit(tiny: dict[str, Path], tmp_path: Path, spec: QuantSpec) -> None:
    # tiny llama: hidden 64, intermediate 112 -> g128 is written as g64; down_proj (112) fits no group.
    llm = _quantized(tiny["llama"], spec)
    ids = random_ids()
    before = llm.model(ids)
    report = save_quantized(llm, tmp_path / "q")
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    if spec.w_bit == 8:
        assert "quantization_config" not in cfg and report.awq_layers == 0
        assert len(report.sidecar_layers) == 9 and any("more than 4 bits" in n for n in report.notes)
    else:
        assert cfg["quantization_config"]["group_size"] == (64 if spec.group_size == 128 else 32)
        assert report.awq_layers == 6 and "layers.0.mlp.down_proj" in report.sidecar_layers
        assert "model.layers.1.mlp.down_proj" in cfg["quantization_config"]["modules_to_not_convert"]
        assert any("cannot be expressed" in n for n in report.notes)
    again = _reload(tmp_path / "q")
    _same_codes(llm.model, again.model)
    assert torch.equal(again.model(ids), before)


def test_awqplus_head_of_tied_model_and_qwen2_biases(tiny: dict[str, Path], tmp_path: Path) -> None:
    for name in ("llama3_rope", "qwen2"):    # both tie lm_head to the embedding; qwen2 has q/k/v biases
        llm = _quantized(tiny[name], QuantSpec("rtn", 4, 32))
        assert isinstance(llm.model.lm_head, QLinearPerGrp)
        assert llm.model.embed_tokens.weight.dtype == torch.bfloat16
        ids = random_ids()
        before = llm.model(ids)
        save_quantized(llm, tmp_path / name)
        with safe_open(str(tmp_path / name / "model.safetensors"), "pt") as f:
            assert "lm_head.weight" not in f.keys()
            assert (name == "qwen2") == ("model.layers.0.self_attn.q_proj.bias" in f.keys())
        again = _reload(tmp_path / name)
        assert isinstance(again.model.lm_head, QLinearPerGrp)
        assert torch.equal(again.model(ids), before)


def test_awqplus_round_trip_keeps_the_lm_head_input_scale(tiny: dict[str, Path], tmp_path: Path,
                                                          monkeypatch) -> None:
    import edgellm.quant.pipeline as pipeline

    monkeypatch.setattr(pipeline, "calibration_ids", lambda tok, cfg: random_ids(n=4, t=32, seed=8))
    llm = edgellm.load(tiny["llama3_rope"], dtype="fp32")
    quantize_llm(llm, QuantSpec("awqplus", 4, 32), dtype=torch.bfloat16, log=lambda m: None)
    ids = random_ids()
    before = llm.model(ids)
    save_quantized(llm, tmp_path / "q")
    with safe_open(str(tmp_path / "q" / SIDECAR), "pt") as f:
        assert "lm_head.input_scale" in f.keys()
    again = _reload(tmp_path / "q")
    assert torch.equal(again.model.lm_head.input_scale, llm.model.lm_head.input_scale)
    assert torch.equal(again.model(ids), before)


def test_phi3_keeps_fused_names(tiny: dict[str, Path], tmp_path: Path) -> None:
    llm = _quantized(tiny["phi3"], QuantSpec("rtn", 4, 32))
    save_quantized(llm, tmp_path / "q")
    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as f:
        assert "model.layers.0.self_attn.qkv_proj.qweight" in f.keys()
        assert "model.layers.0.mlp.gate_up_proj.scales" in f.keys()
    again = _reload(tmp_path / "q")
    ids = random_ids()
    assert torch.equal(again.model(ids), llm.model(ids))


def test_transformers_reads_the_float_parts_with_our_names(tiny: dict[str, Path], tmp_path: Path) -> None:
    """An 8-bit export is a plain float16 checkpoint for other tools: transformers must compute the same model."""
    transformers = pytest.importorskip("transformers")
    llm = _quantized(tiny["llama"], QuantSpec("rtn", 8, 32))
    save_quantized(llm, tmp_path / "q")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.float32)
    ids = random_ids()
    ours = _reload(tmp_path / "q", torch.float32).model(ids)
    with torch.no_grad():
        assert rel_err(hf(ids).logits, ours) < 5e-3
    assert transformers.AwqConfig.from_dict({"quant_method": "awq", "bits": 4, "group_size": 64, "zero_point": True,
                                             "version": "gemm", "modules_to_not_convert": ["lm_head"]})


def test_exported_awq_tensors_follow_the_published_layout(tiny_wide: Path, tmp_path: Path) -> None:
    llm = _quantized(tiny_wide, QuantSpec("rtn", 4, 32))
    save_quantized(llm, tmp_path / "q")
    ref = llm.model.layers[1].self_attn.qkv_proj.dequantized_weight()        # (q, k, v rows) x 64
    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as f:
        parts = [autoawq_dequantize(*(f.get_tensor(f"model.layers.1.self_attn.{p}_proj.{t}")
                                      for t in ("qweight", "qzeros", "scales")), 32).t() for p in "qkv"]
    assert torch.equal(torch.cat(parts), ref)


# ------------------------------------------------------------------ other tools' checkpoints
def _synthetic_autoawq(src: Path, out: Path, group: int = 32) -> dict[str, torch.Tensor]:
    """Quantize a float HF folder the AutoAWQ way (min/max, zero point, fp16 scales) and pack it with the
    published loop. Returns the float reference weights (dequantized) by HF name."""
    shutil.copytree(src, out)
    (out / "model.safetensors").unlink()
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True,
                                  "version": "GEMM"}
    (out / "config.json").write_text(json.dumps(cfg))
    tensors, ref = {}, {}
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        for name in f.keys():
            w = f.get_tensor(name)
            if not (name.endswith("proj.weight") and "layers." in name):
                tensors[name] = w.half()
                continue
            wg = w.reshape(w.shape[0], -1, group)
            mx, mn = wg.amax(-1), wg.amin(-1)
            scales = ((mx - mn).clamp(min=1e-5) / 15).half()
            zeros = (-torch.round(mn / scales.float())).clamp(0, 15)
            q = (torch.round(wg / scales.float()[..., None]) + zeros[..., None]).clamp(0, 15).reshape(w.shape)
            base = name[: -len(".weight")]
            tensors[f"{base}.qweight"] = autoawq_pack(q.t().to(torch.int32))
            tensors[f"{base}.qzeros"] = autoawq_pack(zeros.t().to(torch.int32))
            tensors[f"{base}.scales"] = scales.t().contiguous()
            ref[name] = autoawq_dequantize(tensors[f"{base}.qweight"], tensors[f"{base}.qzeros"],
                                           tensors[f"{base}.scales"], group).t()
    save_file(tensors, str(out / "model.safetensors"))
    return ref


def test_loads_a_synthetic_autoawq_checkpoint(tiny_wide: Path, tmp_path: Path) -> None:
    ref = _synthetic_autoawq(tiny_wide, tmp_path / "awq")
    assert is_quantized_folder(tmp_path / "awq")
    model, _ = load_quantized_model(tmp_path / "awq", torch.float32)
    fused = torch.cat([ref[f"model.layers.0.self_attn.{p}_proj.weight"] for p in "qkv"])
    assert torch.equal(model.layers[0].self_attn.qkv_proj.dequantized_weight(), fused)
    gate_up = torch.cat([ref[f"model.layers.1.mlp.{p}_proj.weight"] for p in ("gate", "up")])
    assert torch.equal(model.layers[1].mlp.gate_up_proj.dequantized_weight(), gate_up)
    # Same logits as the float model holding the reference dequantized weights.
    flt = tmp_path / "float"
    shutil.copytree(tiny_wide, flt)
    with safe_open(str(tiny_wide / "model.safetensors"), "pt") as f:
        state = {k: ref.get(k, f.get_tensor(k).half().float()).contiguous() for k in f.keys()}
    save_file(state, str(flt / "model.safetensors"))
    ids = random_ids()
    expected = edgellm.load(flt, dtype="fp32").model(ids)
    assert rel_err(model(ids), expected) < 1e-5
    bf16, _ = load_quantized_model(tmp_path / "awq", torch.bfloat16)
    assert rel_err(bf16(ids), expected) < 2e-2


def test_rejects_other_awq_versions_and_missing_tensors(tiny_wide: Path, tmp_path: Path) -> None:
    _synthetic_autoawq(tiny_wide, tmp_path / "awq")
    cfg_path = tmp_path / "awq" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["quantization_config"]["version"] = "gemv"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(edgellm.UnsupportedModelError, match="gemv"):
        load_quantized_model(tmp_path / "awq")
    cfg["quantization_config"]["version"] = "gemm"
    cfg_path.write_text(json.dumps(cfg))
    with safe_open(str(tmp_path / "awq" / "model.safetensors"), "pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys() if "layers.1.mlp.up_proj" not in k}
    save_file(state, str(tmp_path / "awq" / "model.safetensors"))
    with pytest.raises(CorruptCheckpointError, match="up_proj"):
        load_quantized_model(tmp_path / "awq")


def test_info_tree_and_edgellm_load(tiny: dict[str, Path], tmp_path: Path) -> None:
    llm = _quantized(tiny["llama"], QuantSpec("rtn", 4, 128))
    save_quantized(llm, tmp_path / "q")
    tree = str(describe_model(tmp_path / "q"))
    assert "(qkv_proj): QLinearPerGrp(in_features:64, out_features:128, bias:None, w_bit:4 group_size:128)" in tree
    assert "(lm_head): QLinearPerGrp(in_features:64, out_features:320, bias:None, w_bit:4 group_size:128)" in tree
    assert describe_model(tiny["llama"]) is None
    loaded = edgellm.load(tmp_path / "q", dtype="bf16")  # the dtype it was quantized in (auto is fp32 on AVX2)
    ids = random_ids()
    assert torch.equal(loaded.model(ids), llm.model(ids))
