"""AWQ: the scale folding is exact, AWQ beats RTN where activations have outliers, resume works."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

import edgellm
from edgellm.errors import InvalidArgumentError
from edgellm.quant import AWQOptions, CalibConfig, QLinearPerGrp, QuantSpec, calibration_ids, quantize_llm, run_awq
from edgellm.quant.convert import install, rtn_weights

from .conftest import random_ids, rel_err

QUIET = dict(log=lambda msg: None)
OPTS = AWQOptions(search_samples=8, batch=8)


def _model(folder: Path, outliers: bool = False):
    model = edgellm.load(folder, dtype="fp32").model
    if outliers:  # a few channels with large activations, as real LLMs have: what AWQ protects
        with torch.no_grad():
            for layer in model.layers:
                layer.input_layernorm.weight[:4] *= 8
                layer.post_attention_layernorm.weight[:4] *= 8
    return model


def test_scales_alone_keep_the_float_function(tiny: dict[str, Path], tiny_mha: Path) -> None:
    for folder, has_v_o in ((tiny_mha, True), (tiny["llama"], False), (tiny["qwen2"], False)):
        model = _model(folder, outliers=True)
        ids = random_ids(t=32)
        before = model(ids)
        results = run_awq(model, random_ids(n=8, t=32, seed=1), QuantSpec("awq", 3, 32),
                          AWQOptions(search_samples=4, clip=False), **QUIET)
        assert ("v_o" in results[0].scales) == has_v_o       # v -> o_proj only without GQA
        assert set(results[0].scales) >= {"attn_in", "mlp_in", "up_down"}
        untouched = _model(folder, outliers=True).layers[0].input_layernorm.weight
        assert not torch.equal(model.layers[0].input_layernorm.weight, untouched)
        assert rel_err(model(ids), before) < 1e-5


@pytest.mark.parametrize("bits,group", [(3, 32), (4, 64)])
def test_awq_beats_rtn_with_activation_outliers(tiny: dict[str, Path], bits: int, group: int) -> None:
    base = _model(tiny["llama"], outliers=True)
    calib, held_out = random_ids(n=16, t=64, seed=2), random_ids(n=4, t=64, seed=3)
    ref = base(held_out)
    spec = QuantSpec("awq", bits, group)
    rtn = copy.deepcopy(base)
    install(rtn, rtn_weights(rtn, spec), torch.float32, fake=True)
    awq = copy.deepcopy(base)
    run_awq(awq, calib, spec, OPTS, **QUIET)
    install(awq, rtn_weights(awq, spec), torch.float32, fake=True)
    err_rtn, err_awq = (rtn(held_out) - ref).pow(2).mean(), (awq(held_out) - ref).pow(2).mean()
    assert err_awq < 0.85 * err_rtn


def test_interrupted_run_resumes_per_layer(tiny: dict[str, Path], tmp_path: Path) -> None:
    calib, spec = random_ids(n=8, t=32, seed=4), QuantSpec("awq", 4, 32)
    full = _model(tiny["llama"], outliers=True)
    run_awq(full, calib, spec, OPTS, **QUIET)

    def stop_after_first(i: int, n: int, seconds: float, eta: float) -> None:
        if i == 0:
            raise KeyboardInterrupt

    first = _model(tiny["llama"], outliers=True)
    with pytest.raises(KeyboardInterrupt):
        run_awq(first, calib, spec, OPTS, cache_dir=tmp_path, progress=stop_after_first, **QUIET)
    assert len(list(tmp_path.glob("*/layer_*.pt"))) == 1
    logs: list[str] = []
    resumed = _model(tiny["llama"], outliers=True)
    run_awq(resumed, calib, spec, OPTS, cache_dir=tmp_path, log=logs.append)
    assert "resumed" in logs[0] and "done" in logs[1] and "ETA" in logs[1]
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_fake_and_real_quantization_agree(tiny: dict[str, Path]) -> None:
    ids = random_ids()
    fake, real = edgellm.load(tiny["llama"], dtype="fp32"), edgellm.load(tiny["llama"], dtype="fp32")
    quantize_llm(fake, "rtn:w4:g32", fake=True, dtype=torch.float32)
    quantize_llm(real, "rtn:w4:g32", dtype=torch.float32)
    assert rel_err(real.model(ids), fake.model(ids)) < 1e-5


def test_calibration_data(tiny: dict[str, Path], data_dir: Path, tmp_path: Path) -> None:
    tok = edgellm.load(tiny["llama"]).tokenizer
    ids = calibration_ids(tok, CalibConfig("wikitext2", n_samples=6, seqlen=64))
    assert ids.shape == (6, 64) and len({tuple(r.tolist()) for r in ids}) == 6
    assert ids.equal(calibration_ids(tok, CalibConfig("wikitext2", n_samples=6, seqlen=64)))   # seeded
    with pytest.raises(InvalidArgumentError, match="test split"):
        calibration_ids(tok, CalibConfig(str(data_dir / "wikitext-2-raw" / "wiki.test.raw")))
    text = tmp_path / "notes.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    assert calibration_ids(tok, CalibConfig(str(text), n_samples=4, seqlen=32)).shape == (4, 32)


def test_awqplus_scales_the_lm_head_input_without_touching_norm_or_embedding(tiny: dict[str, Path],
                                                                             monkeypatch) -> None:
    import edgellm.quant.pipeline as pipeline

    monkeypatch.setattr(pipeline, "calibration_ids", lambda tok, cfg: random_ids(n=8, t=64, seed=5))
    held_out = random_ids(n=4, t=64, seed=6)
    errors = {}
    for head_search in (False, True):
        llm = edgellm.load(tiny["llama3_rope"], dtype="fp32")          # tied embeddings
        with torch.no_grad():
            llm.model.norm.weight[:4] *= 8
        ref = llm.model(held_out)
        norm, emb = llm.model.norm.weight.clone(), llm.model.embed_tokens.weight.clone()
        quantize_llm(llm, "awqplus:w3:g32", dtype=torch.float32, log=lambda m: None,
                     options=AWQOptions(search_samples=4, lm_head_search=head_search))
        head = llm.model.lm_head
        assert isinstance(head, QLinearPerGrp) and (head.input_scale is not None) == head_search
        assert torch.equal(llm.model.norm.weight, norm.half().float())   # only rounded through fp16
        assert torch.equal(llm.model.embed_tokens.weight, emb.half().float())
        errors[head_search] = float((llm.model(held_out) - ref).pow(2).mean())
    assert errors[True] < errors[False]
