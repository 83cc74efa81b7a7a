"""`edgellm quantize` end to end on a tiny model (through quant.cli.register, as FEATURE_MODULES does)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from edgellm.errors import InvalidArgumentError
from edgellm.quant import QLinearPerGrp, load_quantized_model
from edgellm.quant.cli import register


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_quantize_rtn_and_awq(tiny: dict[str, Path], tmp_path: Path, capsys) -> None:
    model = str(tiny["llama"])
    assert _run(["quantize", "--model", model, "--algorithm", "pergrp", "--w-bit", "4", "--group-size", "32",
                 "--out", str(tmp_path / "rtn")]) == 0
    out = capsys.readouterr().out
    assert "| quantized linears" in out and "wrote" in out
    loaded, _ = load_quantized_model(tmp_path / "rtn")
    assert isinstance(loaded.lm_head, QLinearPerGrp)                  # rtn quantizes lm_head too

    calib = tmp_path / "calib.txt"
    calib.write_text("the quick brown fox jumps over the lazy dog, hello world. " * 300)
    argv = ["quantize", "--model", model, "--algorithm", "awq", "--w-bit", "3", "--group-size", "64", "--sym",
            "--calib", str(calib), "--calib-samples", "4", "--calib-seqlen", "32", "--out", str(tmp_path / "awq")]
    assert _run(argv) == 0
    err = capsys.readouterr().err
    assert "AWQ layer 2/2 done" in err and "ETA" in err
    cfg = json.loads((tmp_path / "awq" / "config.json").read_text())
    assert cfg["edgellm_quantization"]["w_bit"] == 3 and cfg["edgellm_quantization"]["sym"] is True
    loaded, _ = load_quantized_model(tmp_path / "awq")
    assert not isinstance(loaded.lm_head, QLinearPerGrp)              # awq leaves lm_head in float
    assert loaded.layers[0].self_attn.o_proj.w_bit == 3
    assert _run(argv) == 0                                            # a rerun resumes from the cache
    assert "resumed" in capsys.readouterr().err


def test_refuses_test_split_and_bad_values(tiny: dict[str, Path], data_dir: Path, tmp_path: Path) -> None:
    base = ["quantize", "--model", str(tiny["llama"]), "--out", str(tmp_path / "x")]
    with pytest.raises(InvalidArgumentError, match="test split"):
        _run(base + ["--calib", str(data_dir / "ptb" / "ptb.test.txt")])
    with pytest.raises(InvalidArgumentError):
        _run(base + ["--quant", "q9_9"])
    with pytest.raises(SystemExit):
        _run(base + ["--w-bit", "5"])
