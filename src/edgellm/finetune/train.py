"""The training engine: autograd through our own model, chunked cross-entropy, AdamW + warm-up/cosine, clipping,
atomic checkpoints that resume bit for bit.

One optimizer step = `grad_accum` micro-batches of `batch` examples; its loss is the sum of the token losses
divided by the step's number of label tokens (HF Trainer's `num_items_in_batch` rule). Checkpoints
(`OUT/checkpoint.pt`, temporary file + rename) hold the adapter, the optimizer, the scheduler, the RNG state and
the number of micro-batches consumed; the data order is a pure function of (seed, epoch), so that number is
the data position.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import InvalidArgumentError
from ..info import count_parameters
from ..kernels import train_ops
from ..lora import LoRALinear, LoRASettings, frozen_linear, lora_modules, save_adapter
from .data import IGNORE, Example, collate, micro_batch

CE_CHUNK_ELEMS = 1 << 23  # logits computed at once: rows * vocab (8M fp32 = 32 MB for the chunk and its grad)


# ---------------------------------------------------------------------------------------------- the loss
class _ChunkedCE(torch.autograd.Function):
    """sum of cross-entropy(head(h), labels) over rows, never holding more than one chunk of logits: each
    chunk's gradient w.r.t. h is computed in forward (softmax - one-hot, through the frozen head) and kept."""

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, labels: torch.Tensor, head: nn.Module) -> torch.Tensor:  # type: ignore[override]
        vocab = head.out_features
        # the fused kernel keeps one chunk of logits in the compute dtype (gradient in place); torch's path an fp32
        # copy and its gradient too: the same bytes for twice the rows in bf16 (fewer passes over the head)
        fused = train_ops.cross_entropy_available(h.dtype)
        step = max(1, CE_CHUNK_ELEMS * (4 // h.element_size() if fused else 1) // vocab)
        need_grad = ctx.needs_input_grad[0]
        grad = torch.empty_like(h) if need_grad else None
        total = torch.zeros((), dtype=torch.float32)
        for i in range(0, h.shape[0], step):
            hc = h[i:i + step].detach().requires_grad_(need_grad)
            with torch.enable_grad():
                logits = frozen_linear(head, hc)                              # (rows, V)
            # the loss and d loss / d logits in one C call (in place over the logits), else log_softmax in torch
            rows = train_ops.cross_entropy_(logits.detach(), labels[i:i + step])
            if rows is not None:
                if need_grad:
                    grad[i:i + step] = torch.autograd.grad(logits, hc, logits.detach())[0]
                total += rows.sum()
                continue
            with torch.enable_grad():
                loss = F.cross_entropy(logits.float(), labels[i:i + step], reduction="sum")
            if need_grad:
                grad[i:i + step] = torch.autograd.grad(loss, hc)[0]
            total += loss.detach()
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        return (None if grad is None else grad * g.to(grad.dtype)), None, None


def hidden_states(model: nn.Module, ids: torch.Tensor, grad_checkpoint: bool = False) -> torch.Tensor:
    """The training-mode forward (no KV cache) up to the final norm; optional activation checkpointing."""
    T = ids.shape[1]
    if model.rope_cos is None or model.rope_cos.shape[0] < T:
        model.init_rope(max(T, model.config.max_seq_len))
    x = model.embed_tokens(ids)
    cos, sin = model.rope_cos[:T].to(x.dtype), model.rope_sin[:T].to(x.dtype)
    for layer in model.layers:
        if grad_checkpoint and torch.is_grad_enabled():
            x = checkpoint(layer, x, cos, sin, 0, False, use_reentrant=False)
        else:
            x = layer(x, cos, sin, 0, False)
    return model.norm(x)


def loss_sum(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor,
             grad_checkpoint: bool = False) -> tuple[torch.Tensor, int]:
    """(sum of next-token losses over labelled positions, their number) for right-padded (B, T) batches."""
    target = labels[:, 1:].reshape(-1)
    keep = target != IGNORE
    h = hidden_states(model, ids[:, :-1], grad_checkpoint)
    h = h.reshape(-1, h.shape[-1])[keep]
    n = int(keep.sum())
    if n == 0:
        return h.sum() * 0.0, 0
    return _ChunkedCE.apply(h, target[keep], model.lm_head), n


# ---------------------------------------------------------------------------------------------- the schedule
def lr_lambda(warmup: int, total: int, schedule: str) -> Callable[[int], float]:
    """HF's get_cosine_schedule_with_warmup / get_constant_schedule_with_warmup / linear."""
    def f(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        if schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    return f


@dataclass
class TrainConfig:
    lr: float = 2e-4
    batch: int = 4
    grad_accum: int = 4
    epochs: float = 3.0
    max_steps: int | None = None
    warmup: int | None = None        # None: min(100, 10 % of the run) (the seeds' 100 steps, capped)
    schedule: str = "cosine"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    eval_every: int = 0
    save_every: int = 50
    grad_checkpoint: bool = False
    log_every: int = 1

    def total_steps(self, n_examples: int) -> int:
        per_epoch = -(-n_examples // self.batch)
        return self.max_steps or max(1, math.ceil(self.epochs * per_epoch / self.grad_accum))

    def warmup_steps(self, total: int) -> int:
        return self.warmup if self.warmup is not None else min(100, total // 10)


# ---------------------------------------------------------------------------------------------- the trainer
class Trainer:
    def __init__(self, model: nn.Module, cfg: TrainConfig, train: list[Example], pad_id: int,
                 out: str | Path, settings: LoRASettings, evals: list[Example] | None = None,
                 base_model: str | None = None, meta: dict[str, Any] | None = None) -> None:
        if not train:
            raise InvalidArgumentError("no training examples")
        self.model, self.cfg, self.train, self.evals, self.pad_id = model, cfg, train, evals or [], pad_id
        self.out, self.settings, self.base_model, self.meta = Path(out), settings, base_model, meta or {}
        self.params = [p for m in lora_modules(model).values() for p in m.parameters() if p.requires_grad]
        if not self.params:
            raise InvalidArgumentError("the model has no trainable LoRA parameters")
        self.total = cfg.total_steps(len(train))
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=False)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lr_lambda(cfg.warmup_steps(self.total), self.total, cfg.schedule))
        self.step = 0
        self.micro = 0           # micro-batches consumed: the data position
        self.tokens = 0
        self.log_path = self.out / "train_log.jsonl"

    # ------------------------------------------------------------------ steps
    def train_step(self) -> dict[str, float]:
        """One optimizer step over grad_accum micro-batches; returns its loss and token count."""
        cfg = self.cfg
        self.model.train()
        batches = [collate(micro_batch(self.train, cfg.batch, cfg.seed, self.micro + i), self.pad_id)
                   for i in range(cfg.grad_accum)]
        n_total = sum(int((lab[:, 1:] != IGNORE).sum()) for _, lab in batches)
        loss_total = 0.0
        for ids, labels in batches:
            s, n = loss_sum(self.model, ids, labels, cfg.grad_checkpoint)
            if n:
                (s / n_total).backward()
            loss_total += float(s.detach())
            self.tokens += int(ids.numel())
        self.micro += cfg.grad_accum
        norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm) if cfg.max_grad_norm > 0 else None
        lr = self.opt.param_groups[0]["lr"]
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        self.model.eval()
        return {"loss": loss_total / max(1, n_total), "lr": lr, "label_tokens": n_total,
                "grad_norm": float(norm) if norm is not None else float("nan")}

    @torch.no_grad()
    def evaluate(self, examples: list[Example] | None = None) -> float:
        """Mean next-token loss over the labelled tokens of `examples` (default: the eval set)."""
        examples = self.evals if examples is None else examples
        self.model.eval()
        total, n = 0.0, 0
        for i in range(0, len(examples), self.cfg.batch):
            ids, labels = collate(examples[i:i + self.cfg.batch], self.pad_id)
            s, k = loss_sum(self.model, ids, labels)
            total, n = total + float(s), n + k
        return total / max(1, n)

    # ------------------------------------------------------------------ checkpoints
    def state(self) -> dict[str, Any]:
        return {"step": self.step, "micro": self.micro, "tokens": self.tokens,
                "adapter": {k: v.detach().clone() for k, v in self.model.state_dict().items() if ".lora_" in k},
                "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                "rng": torch.get_rng_state(), "config": asdict(self.cfg), "meta": self.meta}

    def save_checkpoint(self) -> Path:
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / "checkpoint.pt"
        tmp = path.with_name(f".checkpoint.{os.getpid()}.tmp")
        torch.save(self.state(), tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic: a kill leaves the previous checkpoint or this one, never half of one
        save_adapter(self.model, self.settings, self.out, self.base_model)
        return path

    def load_checkpoint(self) -> None:
        path = self.out / "checkpoint.pt"
        if not path.is_file():
            raise InvalidArgumentError(f"--resume: no checkpoint at {path}")
        st = torch.load(path, map_location="cpu", weights_only=False)
        mine = asdict(self.cfg)
        changed = [k for k in ("lr", "batch", "grad_accum", "seed", "schedule", "warmup", "weight_decay")
                   if st["config"].get(k) != mine.get(k)]
        if changed or st.get("meta") != self.meta:
            what = ", ".join(changed) or "model, data or LoRA settings"
            raise InvalidArgumentError(f"--resume: {path} was written with different {what}")
        missing, _ = self.model.load_state_dict(st["adapter"], strict=False)
        if any(".lora_" in k for k in missing):
            raise InvalidArgumentError(f"--resume: {path} does not hold this model's adapter")
        self.opt.load_state_dict(st["optimizer"])
        self.sched.load_state_dict(st["scheduler"])
        torch.set_rng_state(st["rng"])
        self.step, self.micro, self.tokens = st["step"], st["micro"], st["tokens"]
        if self.log_path.is_file():  # drop log lines of steps after the checkpoint (they will be redone)
            lines = [ln for ln in self.log_path.read_text().splitlines() if ln.strip()
                     and json.loads(ln).get("step", 0) <= self.step]
            self.log_path.write_text("".join(ln + "\n" for ln in lines))

    # ------------------------------------------------------------------ the loop
    def log(self, record: dict[str, Any]) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def run(self, progress: bool = True, stop_after: int | None = None) -> dict[str, Any]:
        """Train to `total` steps (checkpointing every save_every), then save the adapter. stop_after: return
        after that many steps of this call (tests)."""
        from tqdm import tqdm

        cfg = self.cfg
        bar = tqdm(total=self.total, initial=self.step, disable=not progress, unit="step", dynamic_ncols=True)
        t0, tok0, done = time.perf_counter(), self.tokens, 0
        last: dict[str, Any] = {}
        while self.step < self.total:
            rec = self.train_step()
            done += 1
            elapsed = time.perf_counter() - t0
            tok_s = (self.tokens - tok0) / max(elapsed, 1e-9)
            last = {"step": self.step, "loss": round(rec["loss"], 6), "lr": rec["lr"],
                    "grad_norm": round(rec["grad_norm"], 6), "tokens": self.tokens, "tok_s": round(tok_s, 1),
                    "elapsed_s": round(elapsed, 2)}
            if self.step % cfg.log_every == 0 or self.step == self.total:
                self.log(last)
            if self.evals and cfg.eval_every and (self.step % cfg.eval_every == 0 or self.step == self.total):
                last["eval_loss"] = round(self.evaluate(), 6)
                self.log({"step": self.step, "eval_loss": last["eval_loss"]})
            bar.set_postfix(loss=f"{rec['loss']:.4f}", tok_s=f"{tok_s:.0f}", refresh=False)
            bar.update(1)
            if cfg.save_every and self.step % cfg.save_every == 0 and self.step < self.total:
                self.save_checkpoint()
            if stop_after is not None and done >= stop_after:
                break
        bar.close()
        if self.step >= self.total:
            self.save_checkpoint()
        return last


def trainable_summary(model: nn.Module) -> str:
    mods = lora_modules(model)
    n = sum(p.numel() for m in mods.values() for p in m.parameters() if p.requires_grad)
    # the base model's size from its config: 4-bit bases keep their weights as buffers, not parameters
    total = count_parameters(model.config).total
    return f"{len(mods)} LoRA-wrapped linears, trainable params {n:,} ({100 * n / max(1, total + n):.3f} %)"


__all__ = ["LoRALinear", "TrainConfig", "Trainer", "loss_sum", "trainable_summary"]
