"""LoRA on our fused linears, stored and exchanged in PEFT's adapter format.

Our model fuses q/k/v into `qkv_proj` and gate/up into `gate_up_proj`; PEFT adapts HF's separate projections
(Phi-3 is fused in HF too). A `LoRALinear` wraps one of our linears (float, GGUF blocks, per-group int4/int8)
and holds one (A, B) pair per HF projection it covers, each adding scaling * B A x to its rows of the output:
exactly PEFT's `base(x) + lora_B(lora_A(dropout(x))) * scaling` per projection.

Quantized bases stay frozen in their blocks: `frozen_linear` multiplies with them forward as usual and, in
backward, dequantizes them again a few thousand rows at a time (QLoRA without a float copy of the weight).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .errors import CorruptCheckpointError, InvalidArgumentError, UnsupportedModelError
from .kernels import train_ops

PEFT_PREFIX = "base_model.model.model."
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SHORT = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj", "up": "up_proj",
         "down": "down_proj", "qkv": "qkv_proj", "gate_up": "gate_up_proj"}
_KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.default)?"
                  r"\.weight$")


# ---------------------------------------------------------------------------------------------- naming
def projection_slices(config: ModelConfig) -> dict[str, list[tuple[str, int, int]]]:
    """Our linear ("self_attn.qkv_proj") -> [(HF projection ("self_attn.q_proj"), first row, end row)]."""
    from .quant.checkpoint import hf_parts

    totals = {"self_attn.qkv_proj": config.q_size + 2 * config.kv_size, "self_attn.o_proj": config.hidden_size,
              "mlp.gate_up_proj": 2 * config.intermediate_size, "mlp.down_proj": config.hidden_size}
    out: dict[str, list[tuple[str, int, int]]] = {}
    for ours, parts in hf_parts(config).items():
        rows = [totals[ours]] if len(parts) == 1 else [n for _, n in parts]
        starts = [sum(rows[:i]) for i in range(len(rows))]
        out[ours] = [(hf, s, s + n) for (hf, _), s, n in zip(parts, starts, rows, strict=True)]
    return out


def resolve_targets(spec: str | list[str], config: ModelConfig) -> list[str]:
    """`q,k,v,o`, `all-linear` or HF names -> the HF projection leaf names this architecture has (sorted)."""
    names = list(ALL_LINEAR) if spec in ("all-linear", ["all-linear"]) else (
        [s.strip() for s in spec.split(",") if s.strip()] if isinstance(spec, str) else list(spec))
    available = {hf.split(".")[-1] for parts in projection_slices(config).values() for hf, _, _ in parts}
    fused = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj", "gate_proj": "gate_up_proj",
             "up_proj": "gate_up_proj"}
    out = set()
    for n in names:
        leaf = SHORT.get(n, n)
        if leaf not in available and fused.get(leaf) in available:
            leaf = fused[leaf]  # Phi-3: HF fuses these too, so PEFT adapts the fused projection
        if leaf not in available:
            raise InvalidArgumentError(f"unknown LoRA target {n!r} for {config.arch}; choose from "
                                       f"{', '.join(sorted(available))} (or q,k,v,o,gate,up,down / all-linear)")
        out.add(leaf)
    if not out:
        raise InvalidArgumentError("--target names no projection")
    return sorted(out)


# ---------------------------------------------------------------------------------------------- frozen bases
def row_dequantizer(base: nn.Module) -> Callable[[int, int, torch.dtype], torch.Tensor] | None:
    """rows(r0, r1, dtype) -> the exact weight rows of a quantized linear; None for float layers."""
    from .kernels import blockq
    from .kernels.blocklinear import BlockQLinear
    from .quant.linear import QLinearPerGrp

    if isinstance(base, BlockQLinear):
        return lambda r0, r1, dt: blockq.dequantize_rows(base.bits, base.qs, base.dm, base.in_features, r0, r1, dt)
    if isinstance(base, QLinearPerGrp):
        return base.dequantized_rows
    return None


def _row_step(k: int) -> int:
    return max(64, (1 << 22) // k // 64 * 64)  # ~4M weight elements per chunk, rows a multiple of 64


class _DequantMatmul(torch.autograd.Function):
    """y = base(x) for a frozen quantized base; backward dequantizes the weight chunk by chunk again."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, base: nn.Module) -> torch.Tensor:  # type: ignore[override]
        from .kernels.blocklinear import BlockQLinear

        ctx.base = base
        # the exact weight, as backward uses (block weights would take int8 activations for short inputs, and on
        # AVX512-VNNI CPUs for all of them)
        return base.forward_exact(x) if isinstance(base, BlockQLinear) else base(x)

    @staticmethod
    def backward(ctx: Any, gy: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        base = ctx.base
        rows = row_dequantizer(base)
        n, k = base.out_features, base.in_features
        gx = None
        step = _row_step(k)
        for r0 in range(0, n, step):
            r1 = min(n, r0 + step)
            part = gy[..., r0:r1] @ rows(r0, r1, gy.dtype)
            gx = part if gx is None else gx.add_(part)
        return gx, None


def frozen_linear(base: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """base(x) with gradients for x only; quantized bases never materialise a whole float weight."""
    if not (torch.is_grad_enabled() and x.requires_grad) or row_dequantizer(base) is None:
        return base(x)
    scale = getattr(base, "input_scale", None)
    if scale is not None:  # AWQ+'s lm_head scales inputs inside the layer: do it here, differentiably
        x = x * scale.to(x.dtype)
        base.input_scale = None
        try:
            return _DequantMatmul.apply(x, base)
        finally:
            base.input_scale = scale
    return _DequantMatmul.apply(x, base)


# ---------------------------------------------------------------------------------------------- the module
class LoRADropout(nn.Dropout):
    """nn.Dropout (keep with probability 1 - p, scale 1 / (1 - p)) through kernels/train_ops.dropout: the mask is a
    hash of a seed drawn from torch's generator and the element index, recomputed in backward (one pass each way,
    no mask kept; torch's uniform draws were 1.5 of the 2.5 ms a dropout took per layer of a 4 x 256-token bf16
    batch of the default model). Where that kernel is missing, a mask from fp32 uniforms (u >= p)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if self.p == 1:
            return torch.zeros_like(x)
        y = train_ops.dropout(x, self.p)
        if y is not None:
            return y
        keep = torch.rand(x.shape, dtype=torch.float32, device=x.device) >= self.p
        return x * (keep.to(x.dtype) / (1 - self.p))


class LoRALinear(nn.Module):
    """A frozen base linear plus one LoRA pair per HF projection in `slices` ((name, r0, r1) rows of the output)."""

    def __init__(self, base: nn.Module, slices: list[tuple[str, int, int]], r: int, alpha: float,
                 dropout: float = 0.0, use_rslora: bool = False, dtype: torch.dtype = torch.float32,
                 ranks: dict[str, int] | None = None) -> None:
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.slices = list(slices)
        self.alpha, self.use_rslora = alpha, use_rslora
        ranks = ranks or {}
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.scaling: dict[str, float] = {}
        for name, r0, r1 in self.slices:
            key, rk = name.split(".")[-1], ranks.get(name.split(".")[-1], r)
            self.lora_A[key] = nn.Parameter(torch.zeros(rk, self.in_features, dtype=dtype))
            self.lora_B[key] = nn.Parameter(torch.zeros(r1 - r0, rk, dtype=dtype))
            self.scaling[key] = alpha / (math.sqrt(rk) if use_rslora else rk)
        self.dropout = LoRADropout(dropout) if dropout > 0 else nn.Identity()
        self._keys = [name.split(".")[-1] for name, _, _ in self.slices]
        # the output row of each row of the stacked B's, or None where they are rows 0..out-1 in order
        rows = [r for _, r0, r1 in self.slices for r in range(r0, r1)]
        self._b_rows = None if rows == list(range(self.out_features)) else torch.tensor(rows)

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base, "bias", None)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """PEFT's default init: A ~ kaiming_uniform(a=sqrt(5)) (nn.Linear's), B = 0."""
        for key, a in self.lora_A.items():
            bound = 1.0 / math.sqrt(a.shape[1])  # kaiming_uniform_(a=sqrt(5)) == U(-1/sqrt(fan_in), +)
            with torch.no_grad():
                a.uniform_(-bound, bound, generator=generator)
                self.lora_B[key].zero_()

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """The LoRA update of every output row (zeros where no projection is adapted)."""
        return self._add_update(x, None)

    def _add_update(self, x: torch.Tensor, base_out: torch.Tensor | None) -> torch.Tensor:
        """base_out (or 0) + the LoRA update: every adapted projection's A in one product (xd @ [A_q; A_k; ...]^T,
        the rank-r intermediates side by side) and their B's, scaled, as one block-diagonal matrix in a second,
        which adds into base_out (addmm): one pass for what was a product pair, a scaling, zero fill and concat
        per projection plus the sum. The same sum as PEFT's per-projection `lora_B(lora_A(x)) * scaling` up to
        rounding (the scaling is applied to B before the product, not to its result)."""
        xd = self.dropout(x)
        a = torch.cat([self.lora_A[k] for k in self._keys]).to(x.dtype)  # (r total, in)
        b = torch.block_diag(*[self.lora_B[k] * self.scaling[k] for k in self._keys]).to(x.dtype)  # (rows, r total)
        if self._b_rows is not None:  # some projection not adapted: its rows of b are zero
            b = b.new_zeros(self.out_features, b.shape[1]).index_copy(0, self._b_rows, b)
        u = F.linear(xd, a)                                               # (..., r total)
        if base_out is None:
            return F.linear(u, b)
        out = torch.addmm(base_out.reshape(-1, self.out_features), u.reshape(-1, u.shape[-1]), b.T)
        return out.view(*x.shape[:-1], self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._add_update(x, frozen_linear(self.base, x))

    def merged_weight_delta(self) -> torch.Tensor:
        """scaling * B @ A for every output row, fp32 (out, in)."""
        w = torch.zeros(self.out_features, self.in_features)
        for name, r0, r1 in self.slices:
            key = name.split(".")[-1]
            w[r0:r1] = (self.lora_B[key].float() @ self.lora_A[key].float()) * self.scaling[key]
        return w

    def extra_repr(self) -> str:
        return ", ".join(f"{n.split('.')[-1]}: r={self.lora_A[n.split('.')[-1]].shape[0]}" for n, _, _ in self.slices)


# ---------------------------------------------------------------------------------------------- adapters
@dataclass
class LoRASettings:
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    targets: list[str] = field(default_factory=lambda: ["k_proj", "o_proj", "q_proj", "v_proj"])
    use_rslora: bool = False
    ranks: dict[str, int] = field(default_factory=dict)  # per-module rank (PEFT rank_pattern via tensor shapes)

    def peft_config(self, base_model: str | None) -> dict[str, Any]:
        return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
                "r": self.r, "lora_alpha": self.alpha, "lora_dropout": self.dropout,
                "target_modules": list(self.targets), "use_rslora": self.use_rslora, "bias": "none",
                "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True,
                "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {}, "use_dora": False,
                "layers_to_transform": None, "layers_pattern": None, "revision": None}


def inject_lora(model: nn.Module, config: ModelConfig, settings: LoRASettings, dtype: torch.dtype = torch.float32,
                layer_ranks: dict[str, int] | None = None) -> dict[str, LoRALinear]:
    """Wrap every targeted linear of `model` (in place); returns {our module name: LoRALinear}."""
    wanted = set(settings.targets)
    out: dict[str, LoRALinear] = {}
    for i, layer in enumerate(model.layers):  # type: ignore[attr-defined]
        for ours, parts in projection_slices(config).items():
            chosen = [p for p in parts if p[0].split(".")[-1] in wanted]
            if not chosen:
                continue
            name = f"layers.{i}.{ours}"
            base = layer.get_submodule(ours)
            if isinstance(base, LoRALinear):
                raise InvalidArgumentError(f"{name} already carries a LoRA adapter")
            ranks = {k.split(".")[-1]: v for k, v in (layer_ranks or {}).items() if k.startswith(name + ".")}
            m = LoRALinear(base, chosen, settings.r, settings.alpha, settings.dropout, settings.use_rslora, dtype,
                           ranks)
            layer.set_submodule(ours, m)
            out[name] = m
    return out


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """PEFT tensor names -> tensors (A: [r, in], B: [out, r])."""
    state = {}
    for name, m in lora_modules(model).items():
        layer = name.rsplit(".", 2)[0]  # "layers.3"
        for hf, _, _ in m.slices:
            key = hf.split(".")[-1]
            state[f"{PEFT_PREFIX}{layer}.{hf}.lora_A.weight"] = m.lora_A[key].detach()
            state[f"{PEFT_PREFIX}{layer}.{hf}.lora_B.weight"] = m.lora_B[key].detach()
    return state


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_adapter(model: nn.Module, settings: LoRASettings, out: str | Path, base_model: str | None = None) -> Path:
    """Write DIR/adapter_config.json + DIR/adapter_model.safetensors (PEFT's format), each atomically."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.float().contiguous() for k, v in adapter_state_dict(model).items()}
    _atomic_write(out / ADAPTER_WEIGHTS, lambda p: save_file(state, p, metadata={"format": "pt"}))
    text = json.dumps(settings.peft_config(base_model), indent=2)
    _atomic_write(out / ADAPTER_CONFIG, lambda p: Path(p).write_text(text, encoding="utf-8"))
    return out


@dataclass
class Adapter:
    settings: LoRASettings
    tensors: dict[str, torch.Tensor]           # PEFT names
    modules: dict[str, dict[str, dict[str, torch.Tensor]]]  # our module -> HF leaf -> {"A", "B"}
    path: Path


def read_adapter(path: str | Path, config: ModelConfig) -> Adapter:
    """Read a PEFT LoRA adapter folder (ours or PEFT's) and check it fits `config`."""
    from safetensors.torch import load_file

    folder = Path(path)
    cfg_file, weights = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
    if not cfg_file.is_file():
        raise InvalidArgumentError(f"{folder}: no {ADAPTER_CONFIG} (not a PEFT adapter folder)")
    if not weights.is_file():
        if (folder / "adapter_model.bin").is_file():
            raise UnsupportedModelError(f"{folder}: adapter_model.bin (pickle) is not read; save with safetensors")
        raise CorruptCheckpointError(f"{folder}: {ADAPTER_WEIGHTS} missing")
    try:
        pc = json.loads(cfg_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CorruptCheckpointError(f"{cfg_file}: invalid JSON ({e})") from None
    if pc.get("peft_type", "LORA") != "LORA":
        raise UnsupportedModelError(f"{cfg_file}: peft_type {pc.get('peft_type')!r}; only LORA adapters are read")
    for key, bad in (("use_dora", True), ("bias", "all"), ("bias", "lora_only"), ("fan_in_fan_out", True),
                     ("lora_bias", True)):
        if pc.get(key) == bad:
            raise UnsupportedModelError(f"{cfg_file}: {key}={bad!r} is not supported")
    if pc.get("alpha_pattern"):
        raise UnsupportedModelError(f"{cfg_file}: alpha_pattern is not supported")
    try:
        tensors = load_file(str(weights))
    except Exception as e:  # safetensors raises its own error types
        raise CorruptCheckpointError(f"{weights}: {e}") from None
    slices = projection_slices(config)
    leaf_to_ours = {hf: ours for ours, parts in slices.items() for hf, _, _ in parts}
    rows = {hf: (r0, r1) for parts in slices.values() for hf, r0, r1 in parts}
    modules: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    ranks: dict[str, int] = {}
    for key, t in tensors.items():
        m = _KEY.match(key)
        sub = f"{m.group(2)}.{m.group(3)}" if m else None
        if m is None or sub not in leaf_to_ours:
            raise UnsupportedModelError(f"{weights}: tensor {key!r} is not a LoRA weight of a decoder projection "
                                        f"edgellm maps for {config.arch}")
        layer = int(m.group(1))
        if layer >= config.num_layers:
            raise CorruptCheckpointError(f"{weights}: {key!r} names layer {layer}; the model has {config.num_layers}")
        ours = f"layers.{layer}.{leaf_to_ours[sub]}"
        modules.setdefault(ours, {}).setdefault(sub.split(".")[-1], {})[m.group(4)] = t
    for ours, leaves in modules.items():
        for leaf, ab in leaves.items():
            if set(ab) != {"A", "B"}:
                raise CorruptCheckpointError(f"{weights}: {ours} {leaf} needs both lora_A and lora_B")
            sub = next(hf for hf in rows if hf.endswith("." + leaf))
            r0, r1 = rows[sub]
            a, b = ab["A"], ab["B"]
            in_f = config.intermediate_size if leaf == "down_proj" else (
                config.q_size if leaf == "o_proj" else config.hidden_size)
            if a.ndim != 2 or b.ndim != 2 or a.shape[1] != in_f or b.shape[0] != r1 - r0 or b.shape[1] != a.shape[0]:
                raise CorruptCheckpointError(f"{weights}: {ours}.{leaf} has A {tuple(a.shape)}, B {tuple(b.shape)}; "
                                             f"the model needs A [r, {in_f}], B [{r1 - r0}, r]")
            ranks[f"{ours}.{leaf}"] = a.shape[0]
    if not modules:
        raise CorruptCheckpointError(f"{weights}: no LoRA tensors")
    targets = sorted({leaf for leaves in modules.values() for leaf in leaves})
    settings = LoRASettings(r=int(pc.get("r", 8)), alpha=float(pc.get("lora_alpha", 8)), dropout=0.0,
                            targets=targets, use_rslora=bool(pc.get("use_rslora", False)), ranks=ranks)
    return Adapter(settings, tensors, modules, folder)


def attach_adapter(model: nn.Module, config: ModelConfig, adapter: Adapter, trainable: bool = False,
                   dtype: torch.dtype = torch.float32) -> dict[str, LoRALinear]:
    """Wrap the adapted linears and copy the adapter's weights in (training resumes from it, or inference)."""
    mods = inject_lora(model, config, adapter.settings, dtype, layer_ranks=adapter.settings.ranks)
    for name, m in mods.items():
        for leaf, ab in adapter.modules.get(name, {}).items():
            with torch.no_grad():
                m.lora_A[leaf].copy_(ab["A"])
                m.lora_B[leaf].copy_(ab["B"])
        m.requires_grad_(False)
        if trainable:
            m.lora_A.requires_grad_(True)
            m.lora_B.requires_grad_(True)
    return mods


def apply_adapter(model: nn.Module, config: ModelConfig, path: str | Path) -> str:
    """For inference: merge the adapter into float weights; wrap quantized ones. Returns a one-line summary."""
    adapter = read_adapter(path, config)
    rest: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    for name, leaves in adapter.modules.items():
        base = model.get_submodule(name)
        if not (isinstance(base, nn.Linear) and base.weight.is_floating_point()):
            rest[name] = leaves
            continue
        w = base.weight
        with torch.no_grad():
            for hf, r0, r1 in projection_slices(config)[name.split(".", 2)[2]]:
                ab = leaves.get(hf.split(".")[-1])
                if ab is not None:
                    w[r0:r1] = (w[r0:r1].float() + _delta(ab, adapter.settings)).to(w.dtype)
    if rest:
        _attach_some(model, config, Adapter(adapter.settings, adapter.tensors, rest, adapter.path),
                     getattr(model, "dtype", torch.float32))
    return (f"adapter {adapter.path}: {len(adapter.modules) - len(rest)} linears merged, {len(rest)} wrapped "
            "(quantized base)")


def _delta(ab: dict[str, torch.Tensor], s: LoRASettings) -> torch.Tensor:
    rank = ab["A"].shape[0]
    return (ab["B"].float() @ ab["A"].float()) * (s.alpha / (math.sqrt(rank) if s.use_rslora else rank))


def _attach_some(model: nn.Module, config: ModelConfig, adapter: Adapter, dtype: torch.dtype) -> None:
    for name, leaves in adapter.modules.items():
        layer = model.get_submodule(name.rsplit(".", 2)[0])
        ours = name.split(".", 2)[2]
        parts = [p for p in projection_slices(config)[ours] if p[0].split(".")[-1] in leaves]
        ranks = {leaf: ab["A"].shape[0] for leaf, ab in leaves.items()}
        m = LoRALinear(layer.get_submodule(ours), parts, adapter.settings.r, adapter.settings.alpha, 0.0,
                       adapter.settings.use_rslora, dtype, ranks)
        with torch.no_grad():
            for leaf, ab in leaves.items():
                m.lora_A[leaf].copy_(ab["A"])
                m.lora_B[leaf].copy_(ab["B"])
        m.requires_grad_(False)
        layer.set_submodule(ours, m)


def merge_lora(model: nn.Module) -> None:
    """Fold every LoRALinear over a float nn.Linear into its weight and unwrap it (in place)."""
    for name, m in lora_modules(model).items():
        if not isinstance(m.base, nn.Linear):
            raise UnsupportedModelError(f"{name}: cannot merge into a quantized weight; load the base as float")
        with torch.no_grad():
            w = m.base.weight
            w.copy_((w.float() + m.merged_weight_delta()).to(w.dtype))
        model.set_submodule(name, m.base)


def adapter_fingerprint(path: str | Path) -> str:
    """A short hash of an adapter's files (result caches key on it)."""
    import hashlib

    h = hashlib.sha256()
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        f = Path(path) / name
        h.update(f.read_bytes() if f.is_file() else b"-")
    return h.hexdigest()[:12]
