"""`edgellm info`: module tree, parameter counts per part and the memory table, checked against Llama 3.1's
published sizes (the seeds' 16/8/4, 140/70/35 and 810/405/203 GB) and against live models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import edgellm
from edgellm.cli import main
from edgellm.config import ModelConfig
from edgellm.info import count_parameters, info_report, kv_cache_bytes, memory_rows, meta_model

# Meta's published hyperparameters (config.json of meta-llama/Llama-3.1-{8B,70B,405B}).
LLAMA31 = {  # name: (hidden, layers, heads, kv heads, intermediate, exact parameters, seeds' FP16/FP8/INT4 GB)
    "8B": (4096, 32, 32, 8, 14336, 8_030_261_248, (16, 8, 4)),
    "70B": (8192, 80, 64, 8, 28672, 70_553_706_496, (140, 70, 35)),
    "405B": (16384, 126, 128, 8, 53248, 405_853_388_800, (810, 405, 203)),
}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: 1 thread, restored after the module


def llama31_config(name: str) -> dict:
    hidden, layers, heads, kv, inter, _, _ = LLAMA31[name]
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False, "mlp_bias": False,
        "bos_token_id": 128000, "eos_token_id": 128001, "hidden_act": "silu", "hidden_size": hidden,
        "initializer_range": 0.02, "intermediate_size": inter, "max_position_embeddings": 131072,
        "num_attention_heads": heads, "num_hidden_layers": layers, "num_key_value_heads": kv,
        "pretraining_tp": 1, "rms_norm_eps": 1e-05,
        "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "vocab_size": 128256,
    }


@pytest.fixture(scope="module")
def llama31_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("llama31")
    out = {}
    for name in LLAMA31:
        (root / name).mkdir()
        out[name] = root / name / "config.json"
        out[name].write_text(json.dumps(llama31_config(name)))
    return out


def parse_table(text: str, first_header: str) -> tuple[list[str], list[list[str]]]:
    """The markdown table of `text` whose first column header is `first_header`."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|") and
                 line.split("|")[1].strip() == first_header)
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return [c.strip() for c in lines[start].strip("|").split("|")], rows


@pytest.mark.parametrize("name", list(LLAMA31))
def test_llama31_parameter_counts_and_memory(name: str, llama31_files: dict[str, Path],
                                             capsys: pytest.CaptureFixture[str]) -> None:
    *_, exact, (fp16, fp8, int4) = LLAMA31[name]
    config = ModelConfig.from_hf(llama31_config(name))
    assert count_parameters(config).total == exact
    rows = {r[0]: r for r in memory_rows(config, 8192)}
    assert (rows["bf16"][3], rows["fp8"][3], rows["int4"][3]) == (fp16, fp8, int4)

    assert main(["info", "--config", str(llama31_files[name])]) == 0
    out = capsys.readouterr().out
    assert f"Parameters: {exact:,} (llama, {LLAMA31[name][1]} layers" in out
    _, parts = parse_table(out, "Part")
    assert {r[0]: int(r[1]) for r in parts}["total"] == exact
    header, table = parse_table(out, "Precision")
    assert header[:4] == ["Precision", "Bytes/weight", "Weights (GB)", "Nominal (GB)"]
    by_precision = {r[0]: r for r in table}
    assert list(by_precision) == ["fp32", "bf16", "fp8", "int8", "int4"]
    assert [float(by_precision[p][3]) for p in ("bf16", "fp8", "int4")] == [fp16, fp8, int4]
    for p, nbytes in (("fp32", 4), ("bf16", 2), ("fp8", 1), ("int8", 1), ("int4", 0.5)):
        assert float(by_precision[p][2]) == pytest.approx(exact * nbytes / 1e9, rel=5e-6, abs=5e-4)  # 3 decimals


def test_llama31_8b_parts_and_kv_cache(llama31_files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    counts = count_parameters(ModelConfig.from_hf(llama31_config("8B")))
    assert counts.embedding == counts.lm_head == 128256 * 4096
    assert counts.attention == 32 * (4096 * (4096 + 2 * 1024) + 4096 * 4096)
    assert counts.mlp == 32 * 3 * 4096 * 14336
    assert counts.norms == (2 * 32 + 1) * 4096
    # KV cache: 2 (k, v) x 32 layers x 8 kv heads x 128 dims x 2 bytes = 128 KiB per token
    assert main(["info", "--config", str(llama31_files["8B"]), "--context", "131072"]) == 0
    header, table = parse_table(capsys.readouterr().out, "Precision")
    assert header[4] == "KV cache @131072 (GB)"
    kv = 2 * 32 * 8 * 128 * 2 * 131072 / 1e9
    assert all(float(r[4]) == pytest.approx(kv, abs=1e-3) for r in table)
    assert float(table[1][5]) == pytest.approx(8_030_261_248 * 2 / 1e9 + kv, abs=2e-3)


def test_counts_match_transformers(llama31_files: dict[str, Path]) -> None:
    transformers = pytest.importorskip("transformers")
    for name in ("8B", "405B"):
        cfg = transformers.AutoConfig.from_pretrained(llama31_files[name].parent)
        with torch.device("meta"):
            ref = transformers.AutoModelForCausalLM.from_config(cfg)
        assert ref.num_parameters() == LLAMA31[name][5]


@pytest.mark.parametrize("name", list(LLAMA31))
def test_module_tree_is_the_model_print(name: str, llama31_files: dict[str, Path],
                                        capsys: pytest.CaptureFixture[str]) -> None:
    hidden, layers, heads, kv, inter, exact, _ = LLAMA31[name]
    config = ModelConfig.from_hf(llama31_config(name))
    model = meta_model(config)
    assert sum(p.numel() for p in model.parameters()) == exact  # unique parameters of the real module tree
    assert main(["info", "--config", str(llama31_files[name])]) == 0
    out = capsys.readouterr().out
    assert out.startswith(str(model) + "\n")
    assert f"({0}-{layers - 1}): {layers} x DecoderLayer(" in out
    assert f"(qkv_proj): Linear(in_features={hidden}, out_features={hidden + 2 * kv * 128}, bias=False)" in out
    assert f"(gate_up_proj): Linear(in_features={hidden}, out_features={2 * inter}, bias=False)" in out
    assert f"(lm_head): Linear(in_features={hidden}, out_features=128256, bias=False)" in out


@pytest.mark.parametrize("arch", ["llama", "llama3_rope", "mistral", "phi3", "qwen2"])
def test_counts_equal_live_models(arch: str, tiny_checkpoints: dict[str, Path]) -> None:
    llm = edgellm.load(tiny_checkpoints[arch])
    live = sum(p.numel() for p in llm.model.parameters())  # parameters() yields a tied weight once
    counts = count_parameters(llm.config)
    assert counts.total == live
    assert (counts.lm_head == 0) == llm.config.tie_word_embeddings
    report = info_report(llm.config, 64, llm.model)
    assert report.startswith(str(llm.model))
    assert f"Parameters: {live:,}" in report


def test_sliding_window_caps_the_kv_cache(tiny_checkpoints: dict[str, Path]) -> None:
    cfg = ModelConfig.from_hf(json.loads((tiny_checkpoints["mistral"] / "config.json").read_text()))
    assert cfg.sliding_window == 16
    per_token = 2 * cfg.num_layers * cfg.kv_size * 2
    assert kv_cache_bytes(cfg, 8) == 8 * per_token
    assert kv_cache_bytes(cfg, 4096) == 16 * per_token


def test_info_on_a_small_model_uses_exact_sizes(tiny_checkpoints: dict[str, Path],
                                                capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--model", str(tiny_checkpoints["llama"]), "--context", "128"]) == 0
    out = capsys.readouterr().out
    _, table = parse_table(out, "Precision")
    assert all(r[2] == r[3] for r in table)  # below 1B there is no size class: nominal = exact
    assert "nominal =" not in out


def test_info_default_model_without_and_with_weights(monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    import edgellm.cli

    assert main(["info"]) == 0
    meta_out = capsys.readouterr().out
    loaded: list[edgellm.LLM] = []
    real_load = edgellm.cli.load_from_args
    monkeypatch.setattr(edgellm.cli, "load_from_args", lambda args: loaded.append(real_load(args)) or loaded[-1])
    assert main(["info", "--context", "2048"]) == 0
    assert not loaded  # without --load no weights are read
    small_context = capsys.readouterr().out
    assert main(["info", "--load", "--dtype", "fp32"]) == 0
    live_out = capsys.readouterr().out
    assert len(loaded) == 1
    model = loaded[0].model
    assert live_out == meta_out  # the meta module tree prints exactly as the float model does
    assert live_out.startswith(str(model))
    assert f"Parameters: {sum(p.numel() for p in model.parameters()):,} (llama, 30 layers" in live_out
    assert main(["info", "--load"]) == 0  # --dtype auto keeps the GGUF's Q4_1/Q8_0 blocks: the tree says so
    block_out = capsys.readouterr().out
    assert block_out.startswith(str(loaded[1].model)) and "BlockQLinear" in block_out and "Q4" in block_out
    assert block_out.split("\nParameters:")[1] == meta_out.split("\nParameters:")[1]
    assert "KV cache @8192 (GB)" in meta_out and "KV cache @2048 (GB)" in small_context
    _, t8k = parse_table(meta_out, "Precision")
    _, t2k = parse_table(small_context, "Precision")
    assert float(t8k[0][4]) == pytest.approx(4 * float(t2k[0][4]), rel=1e-2)
    assert float(t8k[0][4]) == pytest.approx(2 * 30 * 3 * 64 * 8192 * 2 / 1e9, abs=1e-3)


def test_rope_type_override_is_accepted(llama31_files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--config", str(llama31_files["8B"]), "--rope-type", "simple"]) == 0
    assert "8,030,261,248" in capsys.readouterr().out
