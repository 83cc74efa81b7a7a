"""The training-memory calculator: the published 16 bytes/parameter for full AdamW, LoRA and QLoRA below it."""

from __future__ import annotations

from edgellm.cli import main
from edgellm.config import ModelConfig
from edgellm.finetune.memory import lora_parameters, training_memory
from edgellm.info import count_parameters

from ..test_info import llama31_config


def test_full_adamw_is_16_bytes_per_parameter() -> None:
    for size in ("8B", "70B"):
        cfg = ModelConfig.from_hf(llama31_config(size))
        P = count_parameters(cfg).total
        t = training_memory(cfg, "full", seqlen=512, batch=1)
        assert t.weights + t.gradients + t.optimizer == 16 * P
        lora, qlora = (training_memory(cfg, m, 512, 1) for m in ("lora", "qlora"))
        assert qlora.weights < lora.weights < t.weights and lora.optimizer == 8 * lora_parameters(cfg)
    # the seeds' LoRA on Llama-13B (r 16, q/k/v/o): 26,214,400 trainable parameters
    assert lora_parameters(ModelConfig(hidden_size=5120, num_layers=40, num_heads=40, num_kv_heads=40, head_dim=128,
                                       intermediate_size=13824, vocab_size=32000)) == 26_214_400


def test_info_train_table(capsys) -> None:
    assert main(["info", "--train", "full", "lora", "qlora", "--seqlen", "256", "--batch", "2"]) == 0
    out = capsys.readouterr().out
    assert "Training memory" in out and "| qlora" in out and "16 B/param" in out and "Workspace" in out
