"""LoRA parity with PEFT + transformers on tiny random models of every architecture (fp32): loss and every LoRA
gradient for one batch, the adapters after 10 AdamW steps, and adapters crossing between the two both ways."""

from __future__ import annotations

import pytest
import torch

from edgellm.finetune.data import Example, collate, micro_batch
from edgellm.finetune.train import TrainConfig, Trainer, loss_sum, lr_lambda
from edgellm.loading import load_model
from edgellm.lora import (
    LoRASettings,
    adapter_state_dict,
    attach_adapter,
    read_adapter,
    resolve_targets,
    save_adapter,
)

from ..conftest import TINY_CONFIGS

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")


def hf_and_peft(path, targets, seed=0, rslora=False):
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32,
                                                           attn_implementation="eager")
    cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets, use_rslora=rslora,
                          task_type="CAUSAL_LM")
    pm = peft.get_peft_model(hf, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # B = 0 would make half the gradients trivially zero: start from random adapters
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return pm


def peft_name(n: str) -> str:
    return n.replace(".default", "")


def examples(vocab: int, n: int = 4, T: int = 24, seed: int = 1) -> list[Example]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = T - 3 * (i % 2)  # ragged: right padding in every batch
        ids = torch.randint(3, vocab, (length,), generator=g).tolist()
        labels = [-100] * (2 + i) + ids[2 + i:]  # a masked prompt of varying length
        out.append(Example(ids, labels))
    return out


@pytest.mark.parametrize("arch", list(TINY_CONFIGS))
def test_peft_parity(arch, tiny_checkpoints, tmp_path):
    path = tiny_checkpoints[arch]
    loaded = load_model(path, dtype="fp32")
    targets = resolve_targets("all-linear", loaded.config)
    pm = hf_and_peft(path, targets, rslora=arch == "qwen2")
    pm.save_pretrained(tmp_path / "peft")  # PEFT -> edgellm
    model = loaded.model
    attach_adapter(model, loaded.config, read_adapter(tmp_path / "peft", loaded.config), trainable=True)

    # one batch: loss and every LoRA gradient
    exs = examples(loaded.config.vocab_size)
    ids, labels = collate(exs[:2], pad_id=0)
    s, n = loss_sum(model, ids, labels)
    (s / n).backward()
    ref = pm(input_ids=ids, labels=labels).loss
    ref.backward()
    assert abs(float(s.detach() / n) - float(ref.detach())) <= 1e-5
    grads = {}
    for name, m in model.named_modules():
        if hasattr(m, "slices"):
            layer = name.rsplit(".", 2)[0]
            for hf, _, _ in m.slices:
                key = hf.split(".")[-1]
                grads[f"base_model.model.model.{layer}.{hf}.lora_A.weight"] = m.lora_A[key].grad
                grads[f"base_model.model.model.{layer}.{hf}.lora_B.weight"] = m.lora_B[key].grad
    ref_grads = {peft_name(n): p.grad for n, p in pm.named_parameters() if "lora_" in n}
    assert set(grads) == set(ref_grads) and len(grads) > 0
    worst = max(float((grads[k] - ref_grads[k]).abs().max()) for k in grads)
    print(f"{arch}: loss diff {abs(float(s.detach() / n) - float(ref.detach())):.2e}, grad diff {worst:.2e}")
    assert worst <= 1e-5, worst

    # 10 AdamW steps (warm-up + cosine, clipping) through the Trainer vs the same loop on PEFT
    model.zero_grad(set_to_none=True)
    pm.zero_grad(set_to_none=True)
    cfg = TrainConfig(lr=1e-3, batch=2, grad_accum=1, max_steps=10, warmup=2, save_every=0, seed=3,
                      max_grad_norm=1.0, weight_decay=0.01)
    settings = LoRASettings(r=4, alpha=8, dropout=0.0, targets=targets)
    trainer = Trainer(model, cfg, exs, 0, tmp_path / "ours", settings)
    params = [p for n, p in pm.named_parameters() if "lora_" in n]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(2, 10, "cosine"))
    for k in range(10):
        i2, l2 = collate(micro_batch(exs, 2, 3, k), 0)
        pm(input_ids=i2, labels=l2).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
    trainer.run(progress=False)
    mine = adapter_state_dict(model)
    theirs = {peft_name(n): p.detach() for n, p in pm.named_parameters() if "lora_" in n}
    worst = max(float((mine[k] - theirs[k]).abs().max()) for k in mine)
    print(f"{arch}: adapters after 10 steps diff {worst:.2e}")
    assert worst <= 1e-4, worst

    # edgellm -> PEFT: our saved adapter gives PEFT the same logits as ours
    out = save_adapter(model, LoRASettings(r=4, alpha=8, dropout=0.0, targets=targets,
                                           use_rslora=arch == "qwen2"), tmp_path / "mine")
    base = transformers.AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32,
                                                             attn_implementation="eager")
    back = peft.PeftModel.from_pretrained(base, out)
    with torch.no_grad():
        ref_logits = back(input_ids=ids).logits
        our_logits = model(ids)
    diff = float((ref_logits - our_logits).abs().max())
    print(f"{arch}: PEFT logits with our adapter diff {diff:.2e}")
    assert diff <= 1e-4
