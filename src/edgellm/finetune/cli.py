"""`edgellm finetune` (LoRA / QLoRA on the CPU, PEFT adapters out) and `edgellm merge` (adapter -> HF folder)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from ..errors import InvalidArgumentError

BASES = ("auto", "fp32", "bf16", "int4")


def register(sub: argparse._SubParsersAction) -> None:
    from ..cli import add_model_args

    p = sub.add_parser("finetune", help="LoRA / QLoRA fine-tuning on the CPU (PEFT adapter out)",
                       description="Train a LoRA adapter (PEFT format) on alpaca, chat or text data. Defaults: "
                                   "the seeds' PEFT settings (r 16, alpha 32, dropout 0.05, q/k/v/o, AdamW 2e-4, "
                                   "batch 4 x accumulation 4, 3 epochs).")
    p.add_argument("--model", "-m", default=None, help="GGUF file, HF folder or hub id (default: bundled SmolLM2)")
    p.add_argument("--rope-type", dest="rope_type", default=None, choices=["simple", "llama3.1", "llama3.2"])
    p.add_argument("--data", required=True, help="training data file")
    p.add_argument("--format", default="alpaca", choices=["alpaca", "chat", "text"],
                   help="alpaca JSON/JSONL (instruction, input, output), chat JSONL (messages; loss on assistant "
                        "tokens), text (.txt: language modelling; .jsonl: a 'text' field per record)")
    p.add_argument("--out", "-o", required=True, help="output folder: adapter, checkpoint.pt, train_log.jsonl")
    p.add_argument("--eval-data", default=None, help="held-out data in the same format (eval loss)")
    p.add_argument("--pack", action="store_true", help="pack examples into --seqlen windows")
    g = p.add_argument_group("LoRA")
    g.add_argument("--lora-r", type=int, default=16)
    g.add_argument("--lora-alpha", type=float, default=32.0)
    g.add_argument("--lora-dropout", type=float, default=0.05)
    g.add_argument("--target", default="q,k,v,o", help="q,k,v,o (default) | all-linear | any of q,k,v,o,gate,up,down")
    g.add_argument("--rslora", action="store_true", help="scaling alpha / sqrt(r) (PEFT's use_rslora)")
    g.add_argument("--base", default="auto", choices=BASES,
                   help="frozen base weights: auto (float in the CPU's dtype: bf16 with native bf16, else fp32), "
                        "fp32, bf16, or int4 = QLoRA (a GGUF's 4-bit blocks kept; float checkpoints rounded to "
                        "int4 g32), dequantized per block in forward and backward")
    g.add_argument("--init-adapter", default=None, help="start from this PEFT adapter instead of PEFT's init")
    t = p.add_argument_group("training")
    t.add_argument("--epochs", type=float, default=3.0)
    t.add_argument("--max-steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    t.add_argument("--lr", type=float, default=2e-4)
    t.add_argument("--batch", type=int, default=4, help="examples per micro-batch")
    t.add_argument("--grad-accum", type=int, default=4, help="micro-batches per optimizer step")
    t.add_argument("--seqlen", type=int, default=512, help="tokens per example (longer ones are cut)")
    t.add_argument("--warmup", type=int, default=None, help="warm-up steps (default: min(100, 10%% of the run))")
    t.add_argument("--schedule", default="cosine", choices=["cosine", "linear", "constant"])
    t.add_argument("--weight-decay", type=float, default=0.0)
    t.add_argument("--max-grad-norm", type=float, default=1.0, help="0 = no clipping")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--grad-checkpoint", action="store_true", help="recompute each layer in backward (less memory)")
    t.add_argument("--eval-every", type=int, default=0, help="eval loss every N steps (and at the end)")
    t.add_argument("--save-every", type=int, default=50, help="checkpoint every N steps (atomic)")
    t.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    t.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    t.add_argument("--plot", default=None, help="write a PNG of the training / eval loss (needs matplotlib)")
    t.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("merge", help="merge a LoRA adapter into the base weights and write an HF folder",
                       description="Write BASE + adapter as an HF folder (safetensors), or with --quant an "
                                   "AutoAWQ folder.")
    add_model_args(p)
    p.add_argument("--out", "-o", required=True)
    p.add_argument("--save-dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="dtype of the weights")
    p.add_argument("--quant", default=None, help="quantize after merging, e.g. awq:w4:g128 or rtn:w4:g128 "
                                                 "(writes an AutoAWQ folder)")
    p.set_defaults(func=cmd_merge)


# ---------------------------------------------------------------------------------------------- finetune
def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def load_for_training(model: str | None, base: str, rope_type: str | None = None) -> Any:
    """The frozen base model as `base` says (see --base)."""
    import torch

    from ..loading import load_model, parse_dtype
    from ..quant.convert import linear_names

    if base not in BASES:
        raise InvalidArgumentError(f"--base must be one of {', '.join(BASES)}")
    dtype = parse_dtype("auto") if base in ("auto", "int4") else parse_dtype(base)
    loaded = load_model(model, dtype=dtype, rope_type=rope_type, keep_quantized=base == "int4")
    if base == "int4":
        float_linears = [n for n in linear_names(loaded.model, False)
                         if isinstance(loaded.model.get_submodule(n), torch.nn.Linear)]
        if float_linears:  # a float checkpoint: round the decoder linears to int4 (g32), frozen from now on
            from ..quant.convert import install, rtn_weights
            from ..quant.spec import QuantSpec

            spec = QuantSpec("rtn", 4, 32)
            install(loaded.model, ((n, q) for n, q in rtn_weights(loaded.model, spec) if n in float_linears),
                    dtype)
            # The float tensors left (embedding, norms) may still view the checkpoint's memory-mapped file, which
            # keeps every page read during the rounding resident (+270 MB RSS on the default model): own copies
            # let the mapping go (the int4 codes and scales were made by the rounding, not read from the file).
            with torch.no_grad():
                for t in list(loaded.model.parameters()) + list(loaded.model.buffers()):
                    if t.is_floating_point():
                        t.data = t.data.clone()
            import gc

            gc.collect()
    loaded.model.requires_grad_(False)
    return loaded


def cmd_finetune(args: argparse.Namespace) -> int:
    import torch

    from ..kernels import cpu
    from ..lora import LoRADropout, LoRASettings, attach_adapter, inject_lora, read_adapter, resolve_targets
    from ..peers import peak_rss_mb
    from .data import load_examples
    from .train import TrainConfig, Trainer, trainable_summary

    for name in ("lora_r", "batch", "grad_accum", "seqlen"):
        if getattr(args, name) < 1:
            raise InvalidArgumentError(f"--{name.replace('_', '-')} must be >= 1")
    if not 0 <= args.lora_dropout < 1 or args.lr <= 0 or (args.max_steps is not None and args.max_steps < 1):
        raise InvalidArgumentError("need 0 <= --lora-dropout < 1, --lr > 0 and --max-steps >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    loaded = load_for_training(args.model, args.base, args.rope_type)
    tok, config = loaded.tokenizer, loaded.config
    train = load_examples(args.data, args.format, tok, args.seqlen, args.pack)
    evals = load_examples(args.eval_data, args.format, tok, args.seqlen, args.pack) if args.eval_data else None
    settings = LoRASettings(args.lora_r, args.lora_alpha, args.lora_dropout,
                            resolve_targets(args.target, config), args.rslora)
    torch.manual_seed(args.seed)
    if args.init_adapter:
        adapter = read_adapter(args.init_adapter, config)
        settings.targets, settings.ranks = adapter.settings.targets, adapter.settings.ranks
        mods = attach_adapter(loaded.model, config, adapter, trainable=True)
        for m in mods.values():
            m.dropout = LoRADropout(args.lora_dropout) if args.lora_dropout > 0 else torch.nn.Identity()
    else:
        mods = inject_lora(loaded.model, config, settings)
        g = torch.Generator().manual_seed(args.seed)
        for m in mods.values():
            m.reset_parameters(g)
            m.lora_A.requires_grad_(True)
            m.lora_B.requires_grad_(True)
    cfg = TrainConfig(lr=args.lr, batch=args.batch, grad_accum=args.grad_accum, epochs=args.epochs,
                      max_steps=args.max_steps, warmup=args.warmup, schedule=args.schedule,
                      weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm, seed=args.seed,
                      eval_every=args.eval_every, save_every=args.save_every, grad_checkpoint=args.grad_checkpoint)
    meta = {"model": str(loaded.path), "base": args.base, "data": str(Path(args.data).resolve()),
            "format": args.format, "seqlen": args.seqlen, "pack": args.pack, "lora": vars(settings)}
    trainer = Trainer(loaded.model, cfg, train, tok.pad_id if tok.pad_id is not None else (tok.eos_ids or [0])[0],
                      args.out, settings, evals, base_model=str(loaded.source), meta=json.loads(json.dumps(meta)))
    out = Path(args.out)
    if args.resume:
        trainer.load_checkpoint()
        say(f"resuming at step {trainer.step} (micro-batch {trainer.micro}) from {out / 'checkpoint.pt'}")
    elif (out / "train_log.jsonl").exists():
        (out / "train_log.jsonl").unlink()  # a fresh run starts a fresh log
    n_tok = sum(len(e.ids) for e in train)
    say(f"Model: {loaded.path} ({config.arch}, base {args.base}: {loaded.model.dtype}"
        f"{', 4-bit frozen weights' if args.base == 'int4' else ''}); CPU: {cpu.summary()}")
    say(f"Data: {len(train)} examples ({n_tok} tokens) from {args.data}"
        + (f", {len(evals)} eval examples" if evals else "") + f"; {trainable_summary(loaded.model)}")
    say(f"Steps: {trainer.total} (batch {args.batch} x accumulation {args.grad_accum}, lr {args.lr}, "
        f"warm-up {cfg.warmup_steps(trainer.total)}, {args.schedule}); load {time.perf_counter() - t0:.1f} s")
    last = trainer.run(progress=not args.no_progress)
    if evals and "eval_loss" not in last:
        last["eval_loss"] = round(trainer.evaluate(), 6)
        trainer.log({"step": trainer.step, "eval_loss": last["eval_loss"]})
    summary = {**last, "adapter": str(out), "peak_rss_mb": round(peak_rss_mb(), 1)}
    print(json.dumps(summary))
    if args.plot:
        plot_losses(out / "train_log.jsonl", args.plot)
        say(f"wrote {args.plot}")
    return 0


def plot_losses(log: Path, png: str | Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InvalidArgumentError("--plot needs matplotlib (pip install 'edgellm[plot]')") from None
    recs = [json.loads(ln) for ln in log.read_text().splitlines() if ln.strip()]
    fig, ax = plt.subplots(figsize=(7, 4))
    tr = [(r["step"], r["loss"]) for r in recs if "loss" in r]
    ev = [(r["step"], r["eval_loss"]) for r in recs if "eval_loss" in r]
    if tr:
        ax.plot(*zip(*tr, strict=True), label="train loss")
    if ev:
        ax.plot(*zip(*ev, strict=True), "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- merge
def cmd_merge(args: argparse.Namespace) -> int:
    if not args.adapter:
        raise InvalidArgumentError("merge needs --adapter DIR")
    from ..api import LLM
    from ..loading import load_model, parse_dtype

    loaded = load_model(args.model, dtype="fp32", rope_type=args.rope_type, keep_quantized=False,
                        adapter=args.adapter)  # every weight float: the adapter is merged into all of them
    out = Path(args.out)
    if args.quant:
        from ..quant.checkpoint import save_quantized
        from ..quant.pipeline import quantize_llm

        llm = LLM(loaded)
        quantize_llm(llm, args.quant, dtype=parse_dtype(args.save_dtype if args.save_dtype != "fp32" else "bf16"))
        save_quantized(llm, out, {"algorithm": args.quant, "source": str(loaded.source), "adapter": args.adapter})
    else:
        save_hf_folder(loaded, out, parse_dtype(args.save_dtype))
    print(f"merged {args.adapter} into {loaded.source}; wrote {out}")
    return 0


def save_hf_folder(loaded: Any, out: Path, dtype: Any) -> None:
    """An HF folder (config.json, model.safetensors, tokenizer files) of a float model, q/k/v and gate/up split
    back into HF's projections."""
    from safetensors.torch import save_file

    from ..loading.hf_folder import read_json
    from ..quant.checkpoint import _write_tokenizer, hf_config_from, hf_parts

    model, config = loaded.model, loaded.config
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}

    def put(name: str, t: Any) -> None:
        tensors[name] = t.detach().to(dtype).contiguous().clone()

    put("model.embed_tokens.weight", model.embed_tokens.weight)
    put("model.norm.weight", model.norm.weight)
    if not config.tie_word_embeddings:
        put("lm_head.weight", model.lm_head.weight)
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        put(p + "input_layernorm.weight", layer.input_layernorm.weight)
        put(p + "post_attention_layernorm.weight", layer.post_attention_layernorm.weight)
        for ours, parts in hf_parts(config).items():
            m = layer.get_submodule(ours)
            sizes = [m.out_features] if len(parts) == 1 else [n for _, n in parts]
            for (hf, _), w in zip(parts, m.weight.split(sizes), strict=True):
                put(f"{p}{hf}.weight", w)
            if m.bias is not None:
                for (hf, _), b in zip(parts, m.bias.split(sizes), strict=True):
                    put(f"{p}{hf}.bias", b)
    src = Path(loaded.path)
    hf_cfg = read_json(src / "config.json") if src.is_dir() and (src / "config.json").is_file() else \
        hf_config_from(config)
    hf_cfg.pop("quantization_config", None)
    hf_cfg["torch_dtype"] = {"torch.float32": "float32", "torch.bfloat16": "bfloat16"}.get(str(dtype), "float16")
    (out / "config.json").write_text(json.dumps(hf_cfg, indent=2, ensure_ascii=False), encoding="utf-8")
    _write_tokenizer(loaded.tokenizer, config, src if src.is_dir() else None, out)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
