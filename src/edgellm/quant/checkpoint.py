"""Quantized checkpoints in the AutoAWQ "gemm" layout, readable by transformers/vLLM and by edgellm.

Per quantized linear `P` (HF names, so q/k/v and gate/up are separate; we split our fused rows on export
and fuse them again on import):
    P.qweight  int32 (in, out/8)      8 codes per int32, along the output dim
    P.qzeros   int32 (in/G, out/8)    integer zero points, packed the same way
    P.scales   fp16  (in/G, out)
    weight = (code - zero) * scale
Nibble order: AutoAWQ's GEMM kernel dequantizes 8 outputs at once with interleaved shifts, so nibble i
(bits 4i..4i+3) of packed column c holds output column 8c + AWQ_ORDER[i], AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7].

What the layout cannot express is said in config.json (`edgellm_quantization.notes`) and kept anyway:
- a group size that does not divide in_features (576 with g128): written at the largest of 128/64/32 that
  divides both, with each group's scale/zero repeated (exact); edgellm merges them back on load.
- more than 4 bits, a layer whose in_features no such group divides, and a quantized lm_head (AutoAWQ
  consumers always run lm_head in float): written as float16 dequantized weights in model.safetensors (so
  other tools load them, unquantized) and, exactly, in the sidecar `edgellm_extra.safetensors`, which
  model.safetensors.index.json leaves out so that only edgellm reads it.
- 3-bit codes fit the 4-bit layout as they are (config says bits 4; edgellm restores w_bit 3).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..config import ModelConfig
from ..errors import CorruptCheckpointError, UnsupportedModelError
from ..kernels import torch_lowbit as kernels
from ..loading import meta_transformer
from ..loading.hf_folder import read_json
from ..model import Transformer
from .convert import LAYER_LINEARS, get_module, lm_head_is_tied, set_module
from .linear import QLinearPerGrp
from .pergroup import QuantizedWeight, n_groups

if TYPE_CHECKING:
    from ..api import LLM
    from ..tokenizer import Tokenizer

SIDECAR = "edgellm_extra.safetensors"
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)
FILE_GROUPS = (128, 64, 32)   # group sizes AutoAWQ consumers (transformers, vLLM kernels) accept
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "chat_template.jinja", "chat_template.json", "tokenizer.model")
HF_ARCH = {"llama": ("llama", "LlamaForCausalLM"), "mistral": ("mistral", "MistralForCausalLM"),
           "qwen2": ("qwen2", "Qwen2ForCausalLM"), "phi3": ("phi3", "Phi3ForCausalLM")}


# ---------------------------------------------------------------------------------------------- packing
def pack_awq(codes: torch.Tensor) -> torch.Tensor:
    """(rows, cols) codes 0..15, cols % 8 == 0 -> int32 (rows, cols/8) in AutoAWQ's nibble order."""
    rows, cols = codes.shape
    c = codes.to(torch.int64).reshape(rows, cols // 8, 8)[:, :, list(AWQ_ORDER)]
    shifts = torch.arange(0, 32, 4, dtype=torch.int64)
    packed = (c << shifts).sum(-1)                                   # < 2**32, fits int64
    return torch.where(packed >= 2 ** 31, packed - 2 ** 32, packed).to(torch.int32)  # same bits as uint32


def unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    """int32 (rows, cols/8) -> uint8 codes (rows, cols)."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    nib = (packed.to(torch.int32)[:, :, None] >> shifts) & 0xF      # (rows, cols/8, 8), AWQ order
    return nib[:, :, list(AWQ_REVERSE_ORDER)].reshape(packed.shape[0], -1).to(torch.uint8)


# ---------------------------------------------------------------------------------------------- naming
def hf_parts(config: ModelConfig) -> dict[str, list[tuple[str, int]]]:
    """Our linear name -> [(HF module name, rows)] in row order of our fused weight."""
    if config.arch == "phi3":  # Phi-3 checkpoints are fused like ours
        return {n: [(n, 0)] for n in LAYER_LINEARS}
    q, kv, inter, h = config.q_size, config.kv_size, config.intermediate_size, config.hidden_size
    return {"self_attn.qkv_proj": [("self_attn.q_proj", q), ("self_attn.k_proj", kv), ("self_attn.v_proj", kv)],
            "self_attn.o_proj": [("self_attn.o_proj", h)],
            "mlp.gate_up_proj": [("mlp.gate_proj", inter), ("mlp.up_proj", inter)],
            "mlp.down_proj": [("mlp.down_proj", h)]}


def _row_sizes(parts: list[tuple[str, int]], total: int) -> list[int]:
    return [total] if len(parts) == 1 else [r for _, r in parts]


def hf_config_from(config: ModelConfig) -> dict[str, Any]:
    """An HF config.json for a model that came from GGUF (ModelConfig.from_hf reads it back to the same)."""
    if config.rope_freq_factors is not None:
        raise UnsupportedModelError("this model's RoPE frequency factors (from GGUF) have no HF config "
                                    "equivalent; quantize its HF checkpoint instead")
    model_type, cls = HF_ARCH[config.arch]
    eos = config.eos_token_ids
    d: dict[str, Any] = {
        "architectures": [cls], "model_type": model_type, "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads, "head_dim": config.head_dim,
        "max_position_embeddings": config.max_seq_len, "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta, "rope_scaling": config.rope_scaling, "hidden_act": "silu",
        "tie_word_embeddings": config.tie_word_embeddings, "bos_token_id": config.bos_token_id,
        "eos_token_id": eos[0] if len(eos) == 1 else (list(eos) or None), "attention_bias": config.attention_bias,
    }
    if config.sliding_window is not None:
        d["sliding_window"] = config.sliding_window
        if config.arch == "qwen2":
            d["use_sliding_window"] = True
    if config.name:
        d["_name_or_path"] = config.name
    return d


# ---------------------------------------------------------------------------------------------- export
@dataclass
class SaveReport:
    path: Path
    file_group_size: int | None
    awq_layers: int = 0
    sidecar_layers: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    bytes_on_disk: int = 0


def _expressible(name: str, qw: QuantizedWeight, parts: list[tuple[str, int]], group: int | None) -> bool:
    return (name != "lm_head" and group is not None and qw.bits <= 4 and qw.in_features % group == 0
            and all(r % 8 == 0 for r in _row_sizes(parts, qw.out_features)))


def _choose_file_group(layers: dict[str, tuple[QuantizedWeight, list]]) -> int | None:
    """The AutoAWQ group size to write: a divisor of the model's group size from FILE_GROUPS that lets the
    most layers be written in the standard layout (ties: the larger)."""
    if not layers:
        return None
    g0 = next(iter(layers.values()))[0].group_size
    fits = [g for g in FILE_GROUPS if g0 == -1 or g0 % g == 0]
    if not fits:
        return None
    return max(fits, key=lambda g: (sum(_expressible(n, qw, p, g) for n, (qw, p) in layers.items()), g))


def _sidecar_tensors(name: str, qw: QuantizedWeight, module: QLinearPerGrp) -> dict[str, torch.Tensor]:
    codes = kernels.pack_nibbles(qw.q) if qw.bits <= 4 else qw.q.to(torch.uint8)
    out = {f"{name}.codes": codes.contiguous(), f"{name}.scales": qw.scales.to(torch.float16).contiguous(),
           f"{name}.zeros": qw.zeros.to(torch.uint8).contiguous()}
    if module.input_scale is not None:
        out[f"{name}.input_scale"] = module.input_scale.float().contiguous()
    return out


def _write_tokenizer(tokenizer: Tokenizer, config: ModelConfig, source: Path | None, out: Path) -> None:
    if source is not None and source.is_dir() and (source / "tokenizer.json").is_file():
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copyfile(source / name, out / name)
        return
    # From GGUF metadata: our tokenizers.Tokenizer plus the special-token facts transformers needs.
    (out / "tokenizer.json").write_text(tokenizer.backend.to_str(), encoding="utf-8")
    tcfg: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": tokenizer.add_bos,
                            "add_eos_token": False, "model_max_length": config.max_seq_len,
                            "bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_token}
    if tokenizer.pad_id is not None:
        tcfg["pad_token"] = tokenizer.id_to_token(tokenizer.pad_id)
    if tokenizer.chat_template:
        tcfg["chat_template"] = tokenizer.chat_template
    (out / "tokenizer_config.json").write_text(json.dumps(tcfg, indent=2, ensure_ascii=False), encoding="utf-8")
    gen = {"bos_token_id": config.bos_token_id, "eos_token_id": list(config.eos_token_ids)}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2), encoding="utf-8")


def save_quantized(llm: LLM, out_dir: str | Path, meta: dict[str, Any] | None = None) -> SaveReport:
    """Write `llm` (quantized in place by `quantize_llm`) as an AutoAWQ-gemm folder; see the module docstring."""
    model, config = llm.model, llm.config
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    parts_of = hf_parts(config)
    quantized: dict[str, tuple[QuantizedWeight, list]] = {}
    for name, m in model.named_modules():
        if isinstance(m, QLinearPerGrp):
            suffix = name.split(".", 2)[-1]
            quantized[name] = (m.to_quantized(), parts_of.get(suffix, [(name, 0)]))
    group = _choose_file_group({n: v for n, v in quantized.items() if n != "lm_head"})
    report = SaveReport(out, group)
    tensors: dict[str, torch.Tensor] = {}
    sidecar: dict[str, torch.Tensor] = {}
    sidecar_meta: dict[str, dict[str, Any]] = {}
    not_converted: list[str] = []

    def f16(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to(torch.float16).contiguous()

    tensors["model.embed_tokens.weight"] = f16(model.embed_tokens.weight)
    tensors["model.norm.weight"] = f16(model.norm.weight)
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        tensors[p + "input_layernorm.weight"] = f16(layer.input_layernorm.weight)
        tensors[p + "post_attention_layernorm.weight"] = f16(layer.post_attention_layernorm.weight)
        for ours, parts in parts_of.items():
            name = f"layers.{i}.{ours}"
            module = get_module(model, name)
            sizes = _row_sizes(parts, module.out_features)
            if module.bias is not None:
                for (hf, _), b in zip(parts, module.bias.split(sizes), strict=True):
                    tensors[f"{p}{hf}.bias"] = f16(b)
            if name not in quantized:
                for (hf, _), w in zip(parts, module.weight.split(sizes), strict=True):
                    tensors[f"{p}{hf}.weight"] = f16(w)
                continue
            qw = quantized[name][0]
            if _expressible(name, qw, parts, group):
                for (hf, _), part in zip(parts, qw.regroup(group).split_rows(sizes), strict=True):
                    tensors[f"{p}{hf}.qweight"] = pack_awq(part.q.t())
                    tensors[f"{p}{hf}.qzeros"] = pack_awq(part.zeros.t())
                    tensors[f"{p}{hf}.scales"] = part.scales.t().contiguous()
                report.awq_layers += 1
                continue
            # Not expressible: float16 copy for other tools, exact codes in the sidecar for edgellm.
            for (hf, _), w in zip(parts, module.effective_weight().split(sizes), strict=True):
                tensors[f"{p}{hf}.weight"] = f16(w)
                not_converted.append(f"{p}{hf}")
            sidecar.update(_sidecar_tensors(name, qw, module))
            sidecar_meta[name] = {"bits": qw.bits, "group_size": qw.group_size, "sym": qw.sym}
            report.sidecar_layers.append(name)
    head = model.lm_head
    tied = lm_head_is_tied(model)
    if isinstance(head, QLinearPerGrp):
        qw = quantized["lm_head"][0]
        sidecar.update(_sidecar_tensors("lm_head", qw, head))
        sidecar_meta["lm_head"] = {"bits": qw.bits, "group_size": qw.group_size, "sym": qw.sym}
        report.sidecar_layers.append("lm_head")
        if config.tie_word_embeddings:
            report.notes.append("the quantized lm_head is in the edgellm sidecar only; AutoAWQ consumers tie "
                                "lm_head to the float embedding")
        else:
            tensors["lm_head.weight"] = f16(head.effective_weight())
            report.notes.append("AutoAWQ consumers cannot run a quantized lm_head: model.safetensors holds it "
                                "dequantized in float16; the sidecar holds the codes")
    elif not tied:
        tensors["lm_head.weight"] = f16(head.weight)
    if "lm_head" not in not_converted:
        not_converted.insert(0, "lm_head")
    g0 = next(iter(quantized.values()))[0].group_size if quantized else None
    bits = next(iter(quantized.values()))[0].bits if quantized else None
    if group is not None and g0 != group:
        report.notes.append(f"group size {g0} is written as the equivalent group size {group} (scales repeated) "
                            f"because it does not divide every in_features; edgellm restores {g0} on load")
    if bits == 3 and report.awq_layers:
        report.notes.append("3-bit codes are stored in the 4-bit AutoAWQ layout (config says bits 4)")
    side_linears = [n for n in report.sidecar_layers if n != "lm_head"]
    if side_linears:
        why = "more than 4 bits" if bits and bits > 4 else "in_features not divisible by a supported group size"
        report.notes.append(f"{len(side_linears)} linear layers cannot be expressed in the AutoAWQ gemm layout "
                            f"({why}): stored as float16 for other tools and exactly in {SIDECAR} for edgellm")

    # config.json
    source = Path(llm.loaded.path) if getattr(llm, "loaded", None) is not None else None
    if source is not None and source.is_dir() and (source / "config.json").is_file():
        hf_cfg = read_json(source / "config.json")
    else:
        hf_cfg = hf_config_from(config)
    hf_cfg.pop("quantization_config", None)
    hf_cfg["torch_dtype"] = "float16"
    if "dtype" in hf_cfg:
        hf_cfg["dtype"] = "float16"
    if report.awq_layers:
        hf_cfg["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True,
                                         "version": "gemm", "modules_to_not_convert": not_converted}
    hf_cfg["edgellm_quantization"] = {**(meta or {}), "w_bit": bits, "group_size": g0,
                                      "sym": bool(quantized and next(iter(quantized.values()))[0].sym),
                                      "file_group_size": group, "sidecar": SIDECAR if sidecar else None,
                                      "notes": report.notes}
    (out / "config.json").write_text(json.dumps(hf_cfg, indent=2, ensure_ascii=False), encoding="utf-8")
    _write_tokenizer(llm.tokenizer, config, source, out)

    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    if sidecar:
        save_file(sidecar, str(out / SIDECAR), metadata={"format": "pt", "edgellm_layers": json.dumps(sidecar_meta)})
        # The index lists model.safetensors only, so transformers and vLLM never open the sidecar.
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                 "weight_map": {k: "model.safetensors" for k in tensors}}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
    elif (out / SIDECAR).exists():
        (out / SIDECAR).unlink()
    report.bytes_on_disk = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    return report


# ---------------------------------------------------------------------------------------------- import
def is_quantized_folder(path: str | Path) -> bool:
    """True for a folder whose config.json declares AutoAWQ quantization (or was written by save_quantized)."""
    cfg_path = Path(path) / "config.json"
    if not cfg_path.is_file():
        return False
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, OSError):
        return False
    qc = cfg.get("quantization_config") or {}
    return str(qc.get("quant_method", "")).lower() == "awq" or "edgellm_quantization" in cfg


class QuantizedCheckpoint:
    """An AutoAWQ-gemm folder (ours or another tool's): `.config`, `.hf_config`, `.build(dtype)`."""

    format = "awq"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.hf_config = read_json(self.path / "config.json")
        self.config = ModelConfig.from_hf(self.hf_config)
        self.meta: dict[str, Any] = self.hf_config.get("edgellm_quantization") or {}
        qc = self.hf_config.get("quantization_config") or {}
        self.group: int | None = None
        if qc:
            if str(qc.get("quant_method", "")).lower() != "awq":
                raise UnsupportedModelError(f"{self.path}: quant_method {qc.get('quant_method')!r} is not supported "
                                            "(only AutoAWQ 'awq')")
            version = str(qc.get("version", "gemm")).lower()
            if version != "gemm":
                raise UnsupportedModelError(f"{self.path}: AWQ version {version!r} is not supported (only 'gemm'; "
                                            "'gemv' packs weights differently)")
            if int(qc.get("bits", qc.get("w_bit", 4))) != 4:
                raise UnsupportedModelError(f"{self.path}: AWQ bits={qc.get('bits')} is not supported (only 4)")
            self.group = int(qc.get("group_size", qc.get("q_group_size", 128)))
        self.handles: dict[str, Any] = {}
        for f in self._weight_files():
            try:
                h = safe_open(str(f), framework="pt")
            except Exception as e:
                raise CorruptCheckpointError(f"{f}: not a readable safetensors file ({e})") from e
            for key in h.keys():
                self.handles[key] = h
        side = self.path / SIDECAR
        self.sidecar = safe_open(str(side), framework="pt") if side.is_file() else None
        self.sidecar_meta: dict[str, dict] = json.loads((self.sidecar.metadata() or {}).get("edgellm_layers", "{}")) \
            if self.sidecar is not None else {}

    def _weight_files(self) -> list[Path]:
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            names = sorted(set(read_json(index).get("weight_map", {}).values()))
            return [self.path / n for n in names]
        files = [f for f in sorted(self.path.glob("*.safetensors")) if f.name != SIDECAR]
        if not files:
            raise CorruptCheckpointError(f"{self.path}: no *.safetensors weights")
        return files

    def has(self, name: str) -> bool:
        return name in self.handles

    def get(self, name: str) -> torch.Tensor:
        if name not in self.handles:
            raise CorruptCheckpointError(f"{self.path}: tensor {name!r} is missing")
        return self.handles[name].get_tensor(name)

    # ------------------------------------------------------------------ reading one linear
    def _awq_part(self, name: str) -> QuantizedWeight:
        q = unpack_awq(self.get(f"{name}.qweight")).t()                     # (out, in)
        zeros = unpack_awq(self.get(f"{name}.qzeros")).t()                  # (out, in/G)
        scales = self.get(f"{name}.scales").t().to(torch.float16)           # (out, in/G)
        if q.shape[0] != scales.shape[0] or zeros.shape != scales.shape:
            raise CorruptCheckpointError(f"{self.path}: {name} qweight/qzeros/scales shapes disagree")
        group = self.group if self.group not in (None, -1) else q.shape[1]
        if n_groups(q.shape[1], group) != scales.shape[1]:
            group = q.shape[1] // scales.shape[1]
        return QuantizedWeight(q.contiguous(), scales.contiguous(), zeros.contiguous(), 4, group)

    def _sidecar_weight(self, name: str, in_features: int) -> QuantizedWeight:
        m = self.sidecar_meta[name]
        codes = self.sidecar.get_tensor(f"{name}.codes")
        q = kernels.unpack_nibbles(codes, in_features) if m["bits"] <= 4 else codes
        return QuantizedWeight(q.contiguous(), self.sidecar.get_tensor(f"{name}.scales"),
                               self.sidecar.get_tensor(f"{name}.zeros"), m["bits"], m["group_size"], m["sym"])

    def _restore_meta(self, qw: QuantizedWeight) -> QuantizedWeight:
        """Undo what the AutoAWQ layout forced: merge repeated groups, 3-bit codes, the sym flag."""
        g0, bits = self.meta.get("group_size"), self.meta.get("w_bit")
        if g0 and g0 != qw.group_size and (g0 == -1 or g0 > qw.group_size):
            qw = qw.coarsen(int(g0)) or qw
        if bits and bits < qw.bits and int(qw.q.max()) < 2 ** bits and int(qw.zeros.max()) < 2 ** bits:
            qw.bits = int(bits)
        qw.sym = bool(self.meta.get("sym", False))
        return qw

    def _linear(self, prefix: str, ours: str, parts: list[tuple[str, int]], in_features: int
                ) -> tuple[QuantizedWeight | None, torch.Tensor | None, torch.Tensor | None]:
        """(quantized weight or None, float weight or None, bias or None) of one of our fused linears."""
        names = [f"{prefix}{hf}" for hf, _ in parts]
        bias = torch.cat([self.get(f"{n}.bias") for n in names]) if all(self.has(f"{n}.bias") for n in names) \
            else None
        side_name = f"layers.{prefix.split('.')[2]}.{ours}"
        if side_name in self.sidecar_meta:
            return self._sidecar_weight(side_name, in_features), None, bias
        quant = [self.has(f"{n}.qweight") for n in names]
        if all(quant):
            return self._restore_meta(QuantizedWeight.cat_rows([self._awq_part(n) for n in names])), None, bias
        if any(quant):  # some parts in float (modules_to_not_convert): cannot fuse codes with floats
            ws = [self._awq_part(n).dequantize() if self.has(f"{n}.qweight") else self.get(f"{n}.weight").float()
                  for n in names]
            return None, torch.cat(ws), bias
        return None, torch.cat([self.get(f"{n}.weight") for n in names]), bias

    # ------------------------------------------------------------------ the model
    def build(self, dtype: torch.dtype) -> Transformer:
        cfg = self.config
        model = meta_transformer(cfg)  # skip_init: nn.init on meta tensors would import torch._dynamo (~1 s, ~70 MB)
        state: dict[str, torch.Tensor] = {}
        for hf, ours in (("model.embed_tokens.weight", "embed_tokens.weight"), ("model.norm.weight", "norm.weight")):
            state[ours] = self.get(hf).to(dtype)
        parts_of = hf_parts(cfg)
        for i, layer in enumerate(model.layers):
            p = f"model.layers.{i}."
            for norm in ("input_layernorm", "post_attention_layernorm"):
                state[f"layers.{i}.{norm}.weight"] = self.get(f"{p}{norm}.weight").to(dtype)
            for ours, parts in parts_of.items():
                in_features = get_module(layer, ours).in_features
                qw, w, bias = self._linear(p, ours, parts, in_features)
                if qw is not None:
                    set_module(model, f"layers.{i}.{ours}", QLinearPerGrp.from_quantized(qw, bias, dtype=dtype))
                else:
                    state[f"layers.{i}.{ours}.weight"] = w.to(dtype)
                    if bias is not None:
                        state[f"layers.{i}.{ours}.bias"] = bias.to(dtype)
        head_quantized = "lm_head" in self.sidecar_meta
        if head_quantized:
            model.lm_head = QLinearPerGrp.from_quantized(self._sidecar_weight("lm_head", cfg.hidden_size), dtype=dtype)
            if "lm_head.input_scale" in self.sidecar.keys():
                model.lm_head.set_input_scale(self.sidecar.get_tensor("lm_head.input_scale"))
        elif self.has("lm_head.weight"):
            state["lm_head.weight"] = self.get("lm_head.weight").to(dtype)
        model.load_state_dict(state, strict=False, assign=True)
        if not head_quantized and not self.has("lm_head.weight"):
            if not cfg.tie_word_embeddings:
                raise CorruptCheckpointError(f"{self.path}: lm_head.weight is missing and embeddings are not tied")
            model.tie_weights()
        missing = [n for n, t in _tensors(model) if t.is_meta]
        if missing:
            raise CorruptCheckpointError(f"{self.path}: checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
        model.init_rope()
        return model.eval().requires_grad_(False)


def _tensors(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    yield from model.named_parameters()
    yield from model.named_buffers()


def load_quantized_model(path: str | Path, dtype: torch.dtype = torch.bfloat16) -> tuple[Transformer, ModelConfig]:
    ckpt = QuantizedCheckpoint(path)
    return ckpt.build(dtype), ckpt.config


def load_quantized_llm(path: str | Path, dtype: str | torch.dtype = "bf16", compile: bool = False) -> LLM:
    """`edgellm.load(path)` of a quantized folder (loading/__init__.py routes it to QuantizedCheckpoint)."""
    from ..api import load

    return load(path, dtype=dtype, compile=compile)


def describe_model(path: str | Path) -> Transformer | None:
    """For `edgellm info` without --load: the module tree of a quantized folder (QLinearPerGrp where the
    checkpoint has quantized layers), built on the meta device from config.json alone. None otherwise."""
    if not Path(path).is_dir() or not is_quantized_folder(path):
        return None
    cfg = read_json(Path(path) / "config.json")
    config = ModelConfig.from_hf(cfg)
    meta = cfg.get("edgellm_quantization") or {}
    qc = cfg.get("quantization_config") or {}
    skip = qc.get("modules_to_not_convert") or []
    side = Path(path) / SIDECAR
    side_meta = json.loads((safe_open(str(side), framework="pt").metadata() or {}).get("edgellm_layers", "{}")) \
        if side.is_file() else {}
    bits, group = meta.get("w_bit") or qc.get("bits", 4), meta.get("group_size") or qc.get("group_size", 128)
    model = meta_transformer(config)
    with torch.device("meta"):
        model.tie_weights()
        for i in range(config.num_layers):
            for ours, parts in hf_parts(config).items():
                name = f"layers.{i}.{ours}"
                in_sidecar = name in side_meta
                if not in_sidecar and (not qc or any(f"layers.{i}.{hf}" in s for hf, _ in parts for s in skip)):
                    continue
                old = get_module(model, name)
                set_module(model, name, QLinearPerGrp(old.in_features, old.out_features, bits, group,
                                                      bias=old.bias is not None, device="meta"))
        if "lm_head" in side_meta:
            m = side_meta["lm_head"]
            model.lm_head = QLinearPerGrp(config.hidden_size, config.vocab_size, m["bits"], m["group_size"],
                                          device="meta")
    return model
