"""Load an HF-style folder: config.json + (sharded) safetensors, renamed and fused into our layout."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ..config import ModelConfig
from ..errors import CorruptCheckpointError, ModelNotFoundError


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)")
_DIRECT = {
    "self_attn.o_proj.weight", "self_attn.qkv_proj.weight", "self_attn.qkv_proj.bias",
    "mlp.gate_up_proj.weight", "mlp.down_proj.weight",
    "input_layernorm.weight", "post_attention_layernorm.weight",
}
_FUSED = {  # our fused name -> HF parts, in row order
    "self_attn.qkv_proj.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "self_attn.qkv_proj.bias": ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
    "mlp.gate_up_proj.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
}


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path`; a missing file, bad JSON or a non-object is a one-line typed error."""
    if not path.is_file():
        raise ModelNotFoundError(f"{path}: no such file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptCheckpointError(f"{path}: invalid JSON ({e})") from e
    if not isinstance(data, dict):
        raise CorruptCheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def config_from_hf_dict(cfg: dict[str, Any], where: str | Path = "config.json") -> ModelConfig:
    """ModelConfig.from_hf, with a missing or mistyped field reported as CorruptCheckpointError."""
    try:
        return ModelConfig.from_hf(cfg)
    except KeyError as e:
        raise CorruptCheckpointError(f"{where}: missing required field {e.args[0]!r}") from e
    except (TypeError, ValueError, ZeroDivisionError) as e:
        raise CorruptCheckpointError(f"{where}: invalid value ({e})") from e


def config_from_hf_file(path: Path) -> ModelConfig:
    """A ModelConfig from an HF config.json (no weights needed)."""
    return config_from_hf_dict(read_json(path), path)


class HFCheckpoint:
    """An HF folder: `.config`, `.hf_config` (raw dict) and `tensors(dtype)` yielding our state-dict entries."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        cfg_path = self.path / "config.json"
        if not cfg_path.is_file():
            raise ModelNotFoundError(f"{self.path}: no config.json (not an HF model folder)")
        self.hf_config = read_json(cfg_path)
        self.config = config_from_hf_dict(self.hf_config, cfg_path)
        gen_path = self.path / "generation_config.json"
        if gen_path.is_file():  # generation_config.json's eos ids (e.g. Llama 3's <|eot_id|>) also end a turn
            eos = read_json(gen_path).get("eos_token_id")
            for e in eos if isinstance(eos, list) else [eos]:
                if isinstance(e, int) and e not in self.config.eos_token_ids:
                    self.config.eos_token_ids.append(e)
        self.files = self._weight_files()
        self.index: dict[str, Path] = {}
        self.handles: dict[Path, Any] = {}
        for f in self.files:
            try:
                h = safe_open(str(f), framework="pt")
                keys = list(h.keys())
            except Exception as e:  # safetensors raises SafetensorError (not exported in every version)
                raise CorruptCheckpointError(f"{f}: not a readable safetensors file ({_one_line(e)})") from e
            self.handles[f] = h
            for key in keys:
                self.index[key] = f

    def _weight_files(self) -> list[Path]:
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CorruptCheckpointError(f"{index}: no 'weight_map' entries")
            names = sorted(set(weight_map.values()))
            files = [self.path / n for n in names]
            missing = [str(f.name) for f in files if not f.is_file()]
            if missing:
                raise CorruptCheckpointError(f"{self.path}: shards listed in the index are missing: {missing}")
            return files
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise ModelNotFoundError(f"{self.path}: no *.safetensors weights")
        return files

    def _get(self, name: str) -> torch.Tensor:
        if name not in self.index:
            raise CorruptCheckpointError(f"{self.path}: tensor {name!r} is missing")
        try:
            return self.handles[self.index[name]].get_tensor(name)
        except Exception as e:
            raise CorruptCheckpointError(f"{self.index[name]}: cannot read tensor {name!r} ({_one_line(e)})") from e

    def tensors(self, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
        cfg = self.config
        for hf, ours in (("model.embed_tokens.weight", "embed_tokens.weight"), ("model.norm.weight", "norm.weight"),
                         ("lm_head.weight", "lm_head.weight")):
            if hf in self.index:
                yield ours, self._get(hf).to(dtype)
        for i in range(cfg.num_layers):
            p = f"model.layers.{i}."
            for name in _DIRECT:
                if p + name in self.index:
                    yield f"layers.{i}.{name}", self._get(p + name).to(dtype)
            for fused, parts in _FUSED.items():
                if p + parts[0] in self.index:
                    yield f"layers.{i}.{fused}", torch.cat([self._get(p + part) for part in parts]).to(dtype)
        for name in self.index:
            m = _LAYER_RE.match(name)
            if m and int(m.group(1)) >= cfg.num_layers:
                raise CorruptCheckpointError(f"{self.path}: tensor {name} beyond num_hidden_layers={cfg.num_layers}")
