"""Training speed and memory: edgellm finetune's engine vs HF transformers + PEFT on the CPU, same run.

    python scripts/bench_finetune.py --steps 6 --seqlen 256 --batch 4 --threads 1 [--base auto|int4]

Both sides train LoRA (r 16, alpha 32, dropout 0.05, q/k/v/o, AdamW 2e-4) on the same PTB-valid windows of the
same weights (the default model dequantized once into an HF folder), in their own processes with the same thread
count and compute dtype (bf16 where the CPU has it, as `--dtype auto`). Reports tokens/s over the steps after
the first, peak RSS (VmHWM) and the RSS before the model was loaded (the runtime baseline). The training peak is
also reported on its own: after loading, freed heap goes back to the OS and the kernel's peak counter is reset
(`/proc/self/clear_refs`), so `train_peak_above_baseline_mb` is what the training steps need on top of the runtime
(the quantity `edgellm info --train` estimates), not the loading transient.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HF_DIR = Path("/tmp/edgellm-bench-finetune/smollm2-hf")


def rss_mb(field: str = "VmRSS") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def reset_peak() -> None:
    """Return freed heap to the OS, then restart VmHWM from the current RSS (Linux: clear_refs 5)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def windows(tok_encode, seqlen: int, n: int) -> list[list[int]]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    text = (Path(__file__).resolve().parents[2] / "shared" / "data" / "ptb" / "ptb.valid.txt").read_text()
    ids = tok_encode(text[:400_000])
    return [ids[i * seqlen:(i + 1) * seqlen] for i in range(n)]


def run_edgellm(a: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(a.threads)
    from edgellm.finetune.cli import load_for_training
    from edgellm.finetune.train import loss_sum
    from edgellm.lora import LoRASettings, inject_lora

    base_rss = rss_mb()
    ld = load_for_training(str(HF_DIR), a.base)
    mods = inject_lora(ld.model, ld.config, LoRASettings())
    g = torch.Generator().manual_seed(0)
    params = []
    for m in mods.values():
        m.reset_parameters(g)
        for p in list(m.lora_A.values()) + list(m.lora_B.values()):
            p.requires_grad_(True)
            params.append(p)
    opt = torch.optim.AdamW(params, lr=2e-4)
    data = torch.tensor(windows(ld.tokenizer.encode, a.seqlen, a.batch * a.steps))
    ld.model.train()
    return train_loop(a, opt, params, data, lambda ids: loss_sum(ld.model, ids, ids), base_rss, str(ld.model.dtype))


def run_hf(a: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(a.threads)
    import peft
    import transformers

    from edgellm.loading import parse_dtype

    base_rss = rss_mb()
    dtype = parse_dtype("auto")
    model = transformers.AutoModelForCausalLM.from_pretrained(HF_DIR, torch_dtype=dtype)
    model.config.use_cache = False
    cfg = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=["q_proj", "k_proj", "v_proj",
                                                                                  "o_proj"], task_type="CAUSAL_LM")
    pm = peft.get_peft_model(model, cfg)
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4)
    tok = transformers.AutoTokenizer.from_pretrained(HF_DIR)
    data = torch.tensor(windows(lambda t: tok(t, add_special_tokens=False)["input_ids"], a.seqlen, a.batch * a.steps))
    pm.train()

    def loss(ids):
        out = pm(input_ids=ids, labels=ids)
        return out.loss * (ids.numel() - ids.shape[0]), ids.numel() - ids.shape[0]
    return train_loop(a, opt, params, data, loss, base_rss, str(dtype))


def train_loop(a, opt, params, data, loss_fn, base_rss: float, dtype: str) -> dict:
    load_peak = rss_mb("VmHWM")
    reset_peak()
    times = []
    for s in range(a.steps):
        t = time.perf_counter()
        ids = data[s * a.batch:(s + 1) * a.batch]
        total, n = loss_fn(ids)
        (total / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    tok = a.batch * a.seqlen
    peak = max(load_peak, rss_mb("VmHWM"))
    return {"dtype": dtype, "tok_s": round(tok * (a.steps - 1) / sum(times[1:]), 1),
            "first_step_s": round(times[0], 2), "peak_rss_mb": round(peak, 1),
            "baseline_rss_mb": round(base_rss, 1), "above_baseline_mb": round(peak - base_rss, 1),
            "load_peak_mb": round(load_peak, 1),
            "train_peak_above_baseline_mb": round(rss_mb("VmHWM") - base_rss, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--base", default="auto", choices=["auto", "int4"])
    ap.add_argument("--side", default=None, choices=["edgellm", "hf"])
    a = ap.parse_args()
    if a.side:
        print(json.dumps((run_edgellm if a.side == "edgellm" else run_hf)(a)))
        return
    if not (HF_DIR / "model.safetensors").is_file():
        from edgellm.finetune.cli import save_hf_folder
        from edgellm.loading import load_model, parse_dtype

        save_hf_folder(load_model(None, dtype="fp32", keep_quantized=False), HF_DIR, parse_dtype("bf16"))
    res = {}
    for side in (["edgellm"] if a.base == "int4" else ["edgellm", "hf"]):
        cmd = [sys.executable, __file__, "--side", side] + [f"--{k}={getattr(a, k)}" for k in
                                                              ("steps", "seqlen", "batch", "threads", "base")]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        res[side] = json.loads(out.strip().splitlines()[-1])
        print(side, res[side], flush=True)
    if "hf" in res:
        e, h = res["edgellm"], res["hf"]
        print(json.dumps({"speedup": round(e["tok_s"] / h["tok_s"], 2),
                          "peak_rss_ratio": round(e["peak_rss_mb"] / h["peak_rss_mb"], 2)}))


if __name__ == "__main__":
    main()
