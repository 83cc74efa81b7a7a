"""`edgellm finetune` / `merge` / `--adapter` end to end on tiny models: crash-safe resume (SIGKILL), chat masking
equal to TRL's assistant-only rule, QLoRA gradients, one-line data errors, merged folders for transformers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from edgellm.cli import main
from edgellm.finetune.data import chat_example, load_examples
from edgellm.finetune.train import loss_sum
from edgellm.loading import load_model
from edgellm.lora import LoRASettings, inject_lora, resolve_targets

pytestmark = pytest.mark.usefixtures("one_thread")
WORDS = "the quick brown fox jumps over the lazy dog hello world there".split()


def text_file(path, n_words=3000, seed=0):
    g = torch.Generator().manual_seed(seed)
    path.write_text(" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (n_words,), generator=g).tolist()))
    return path


def finetune_cmd(model, data, out, *extra):
    return [sys.executable, "-m", "edgellm", "finetune", "--model", str(model), "--data", str(data), "--format",
            "text", "--out", str(out), "--base", "fp32", "--seqlen", "32", "--batch", "2", "--grad-accum", "2",
            "--lora-r", "4", "--lora-dropout", "0.1", "--threads", "1", "--no-progress", *extra]


def test_sigkill_then_resume_is_bit_identical(tiny_checkpoints, tmp_path):
    model = tiny_checkpoints["llama"]
    data = text_file(tmp_path / "train.txt")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    steps = ["--max-steps", "240", "--save-every", "60"]
    subprocess.run(finetune_cmd(model, data, tmp_path / "a", *steps), check=True, env=env, capture_output=True)
    out = tmp_path / "b"
    proc = subprocess.Popen(finetune_cmd(model, data, out, *steps), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    log = out / "train_log.jsonl"
    deadline = time.time() + 300
    last = 0
    while time.time() < deadline and proc.poll() is None:
        if log.is_file():
            lines = log.read_text().splitlines()
            last = json.loads(lines[-1])["step"] if lines and lines[-1].endswith("}") else last
            if last >= 70 and last % 60 != 0:
                break
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
    assert 60 <= ckpt["step"] < last < 240, (ckpt["step"], last)  # killed between two checkpoints
    subprocess.run(finetune_cmd(model, data, out, *steps, "--resume"), check=True, env=env, capture_output=True)
    a = load_file(tmp_path / "a" / "adapter_model.safetensors")
    b = load_file(out / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    la = [json.loads(x) for x in (tmp_path / "a" / "train_log.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in log.read_text().splitlines()]
    assert [r["loss"] for r in la] == [r["loss"] for r in lb]


MARKED = ("{% for m in messages %}<s>{{ m['role'] }}:{% if m['role'] == 'assistant' %}{% generation %} "
          "{{ m['content'] }}</s>{% endgeneration %}{% else %} {{ m['content'] }}</s>{% endif %}{% endfor %}"
          "{% if add_generation_prompt %}<s>assistant:{% endif %}")


def test_chat_mask_equals_trl_assistant_only(tiny_checkpoints):
    """TRL's assistant_only_loss = transformers' return_assistant_tokens_mask over a template with
    {% generation %} markers; our rule on the plain template must mark the same tokens."""
    transformers = pytest.importorskip("transformers")
    path = tiny_checkpoints["llama"]
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"},
            {"role": "assistant", "content": "hello world"}, {"role": "user", "content": "the fox?"},
            {"role": "assistant", "content": "the quick brown fox jumps"}]
    hf = transformers.AutoTokenizer.from_pretrained(path)
    ref = hf.apply_chat_template(msgs, chat_template=MARKED, tokenize=True, return_dict=True,
                                 return_assistant_tokens_mask=True)
    ex = chat_example(load_model(path, dtype="fp32").tokenizer, msgs)
    assert ex.ids == list(ref["input_ids"])
    assert [int(t != -100) for t in ex.labels] == list(ref["assistant_masks"])
    assert sum(ref["assistant_masks"]) > 0


def int4_and_dequantized(path):
    """The tiny model with int4 (RTN g32) frozen linears, and a float copy of exactly those weights."""
    from edgellm.finetune.cli import load_for_training
    from edgellm.quant.linear import QLinearPerGrp

    q = load_for_training(path, "int4")
    q.model.float()
    f = load_model(path, dtype="fp32")
    fp = dict(f.model.named_parameters())
    for name, t in q.model.named_parameters():  # embeddings, norms, biases: bf16-rounded in q (dtype auto)
        fp[name].data.copy_(t)
    for name, m in q.model.named_modules():
        if isinstance(m, QLinearPerGrp) and name != "lm_head":
            f.model.get_submodule(name).weight.data.copy_(m.dequantized_weight(torch.float32))
    if isinstance(q.model.lm_head, QLinearPerGrp):
        f.model.lm_head = torch.nn.Linear(64, f.config.vocab_size, bias=False)
        f.model.lm_head.weight.data = q.model.lm_head.dequantized_weight(torch.float32)
    return q, f


def test_qlora_gradients_match_dequantized_float(tiny_checkpoints):
    """LoRA over frozen int4 weights (dequantized chunk by chunk in backward) == LoRA over the same weights
    dequantized to a float nn.Linear."""
    from edgellm.quant.linear import QLinearPerGrp

    path = tiny_checkpoints["qwen2"]
    q, f = int4_and_dequantized(path)
    grads = []
    for ld in (q, f):
        mods = inject_lora(ld.model, ld.config, LoRASettings(r=4, alpha=8, dropout=0.0,
                                                             targets=resolve_targets("all-linear", ld.config)))
        g = torch.Generator().manual_seed(0)
        for m in mods.values():
            for p in list(m.lora_A.values()) + list(m.lora_B.values()):
                p.data = torch.randn(p.shape, generator=g) * 0.05
                p.requires_grad_(True)
        ids = torch.randint(3, 300, (2, 20), generator=torch.Generator().manual_seed(1))
        s, n = loss_sum(ld.model, ids, ids)
        s.backward()
        grads.append((float(s.detach()), [p.grad for m in mods.values() for p in m.parameters() if p.requires_grad]))
    assert isinstance(q.model.layers[0].self_attn.qkv_proj.base, QLinearPerGrp)
    assert abs(grads[0][0] - grads[1][0]) <= 1e-3
    assert max(float((a - b).abs().max()) for a, b in zip(grads[0][1], grads[1][1], strict=True)) <= 1e-4


def test_malformed_record_is_one_line(tiny_checkpoints, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n\n{"instruction": "c"}\n')
    rc = main(["finetune", "--model", str(tiny_checkpoints["llama"]), "--data", str(bad), "--out",
               str(tmp_path / "o"), "--base", "fp32"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err
    assert f"{bad}:3: field 'output' missing" in err
    chat = tmp_path / "c.jsonl"
    chat.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    with pytest.raises(Exception, match=r"c.jsonl:1: .*no assistant message"):
        load_examples(chat, "chat", load_model(tiny_checkpoints["llama"], dtype="fp32").tokenizer, 64)


def test_merge_and_adapter_flag_match_peft(tiny_checkpoints, tmp_path, capsys):
    """A PEFT-made adapter: `--adapter` (merged into float weights, wrapped around int4 ones) and `edgellm merge`
    give PEFT's logits."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from edgellm.api import load

    path = tiny_checkpoints["mistral"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj",
                                                                                      "down_proj"]))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.05)
    pm.save_pretrained(tmp_path / "ad")
    ids = torch.randint(3, 300, (1, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = pm(input_ids=ids).logits[0]
    llm = load(path, dtype="fp32", adapter=tmp_path / "ad")
    assert float((llm.logits(ids[0]) - ref).abs().max()) <= 1e-4
    assert main(["merge", "--model", str(path), "--adapter", str(tmp_path / "ad"), "--out", str(tmp_path / "m")]) == 0
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m", torch_dtype=torch.float32)
    with torch.no_grad():
        assert float((merged(input_ids=ids).logits[0] - ref).abs().max()) <= 1e-4
    # merge --quant: the merged weights quantized, as a checkpoint edgellm loads back (what --quant of the merged
    # folder gives)
    assert main(["merge", "--model", str(path), "--adapter", str(tmp_path / "ad"), "--out", str(tmp_path / "mq"),
                 "--quant", "rtn:w4:g32"]) == 0
    from edgellm.quant.pipeline import quantize_llm

    ckpt = load(tmp_path / "mq", dtype="fp32").logits(ids[0])
    merged_q, base_q = load(tmp_path / "m", dtype="fp32"), load(path, dtype="fp32")
    for m in (merged_q, base_q):  # merge --quant rounds in bf16 (its scales): compare within that rounding
        quantize_llm(m, "rtn:w4:g32", dtype=torch.float32)
    d_merged = float((ckpt - merged_q.logits(ids[0])).abs().max())
    d_base = float((ckpt - base_q.logits(ids[0])).abs().max())         # the adapter left out
    assert d_merged <= 0.05 and d_merged < d_base / 10, (d_merged, d_base)
    # quantized base: the adapter wraps the int4 layers; equal to merging it into their dequantized weights
    from edgellm.lora import LoRALinear, apply_adapter

    q, f = int4_and_dequantized(path)
    with torch.no_grad():
        apply_adapter(q.model, q.config, tmp_path / "ad")
        apply_adapter(f.model, f.config, tmp_path / "ad")
        assert isinstance(q.model.layers[0].self_attn.qkv_proj, LoRALinear)
        assert not isinstance(f.model.layers[0].self_attn.qkv_proj, LoRALinear)
        assert float((q.model(ids) - f.model(ids)).abs().max()) <= 1e-4
