"""Turn a `--model` value into a Transformer, a Tokenizer and a description of where it came from.

Accepted values: None (the bundled SmolLM2-135M-Instruct GGUF), a `.gguf` file, an HF folder, an AutoAWQ
folder, or a hub id (`org/name`, or `org/name:file.gguf` for one GGUF file of a repo).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import ModelConfig
from ..errors import CorruptCheckpointError, InvalidArgumentError, ModelNotFoundError
from ..kernels import cpu
from ..kernels.blocklinear import BlockQEmbedding, BlockQLinear, BlockWeight
from ..memory import release_free_memory
from ..model import Transformer
from ..tokenizer import Tokenizer
from .default import default_model_path
from .gguf_file import GGUFCheckpoint
from .hf_folder import HFCheckpoint
from .hub import download_from_hub, looks_like_hub_id

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model: Transformer
    tokenizer: Tokenizer
    config: ModelConfig
    source: str          # what the user asked for
    path: Path           # the file or folder read
    format: str          # "gguf" | "hf"
    adapter: str | None = None  # the LoRA adapter folder applied (merged into float weights, wrapping quantized)


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """"auto" is bf16 where the CPU computes bf16 natively, else fp32 (never torch's slow bf16 fallback)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return DTYPES[cpu.auto_dtype()]
    if dtype not in DTYPES:
        raise InvalidArgumentError(f"unknown dtype {dtype!r}; choose from auto, fp32, bf16, fp16")
    return DTYPES[dtype]


def resolve(model: str | Path | None) -> Path:
    """Map a --model value to a local GGUF file or folder, downloading hub ids when online."""
    if model is None or str(model) in ("", "default"):
        return default_model_path()
    path = Path(model).expanduser()
    if path.exists():
        return path
    if looks_like_hub_id(str(model)):
        return download_from_hub(str(model))
    raise ModelNotFoundError(f"model not found: {str(model)!r} is neither a local file/folder nor a hub id "
                             "(org/name or org/name:file.gguf)")


# torch.nn.init functions that module constructors call. On the meta device their work is pointless, and the
# first meta normal_() imports torch's Python decompositions (~800 modules, ~80 MB of RSS, ~1 s).
_INIT_FUNCTIONS = ("normal_", "uniform_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_",
                   "xavier_normal_", "trunc_normal_", "constant_", "ones_", "zeros_")


@contextmanager
def skip_init() -> Iterator[None]:
    """Make torch.nn.init a no-op while modules are constructed (as transformers' no_init_weights does)."""
    saved = {name: getattr(torch.nn.init, name) for name in _INIT_FUNCTIONS}

    def noop(tensor: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        return tensor

    try:
        for name in _INIT_FUNCTIONS:
            setattr(torch.nn.init, name, noop)
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.nn.init, name, fn)


def meta_transformer(config: ModelConfig) -> Transformer:
    """The module tree on the meta device: shapes only, no memory, no random init."""
    with skip_init(), torch.device("meta"):
        return Transformer(config)


def build_model(config: ModelConfig, tensors: Iterable[tuple[str, torch.Tensor | BlockWeight]],
                dtype: torch.dtype) -> Transformer:
    """Construct on the meta device, then assign the streamed tensors (no random init, no second copy).
    BlockWeight entries (GGUF blocks kept quantized) replace their nn.Linear / nn.Embedding by the block layers;
    a tied lm_head then shares the embedding's blocks."""
    model = meta_transformer(config)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    state: dict[str, torch.Tensor] = {}
    blocks: dict[str, BlockWeight] = {}
    for name, tensor in tensors:
        if name not in expected:
            raise CorruptCheckpointError(f"unexpected tensor {name!r}")
        if tuple(tensor.shape) != tuple(expected[name]):
            raise CorruptCheckpointError(
                f"tensor {name!r} has shape {tuple(tensor.shape)}, config implies {tuple(expected[name])}"
            )
        if isinstance(tensor, BlockWeight):
            blocks[name] = tensor
        else:
            state[name] = tensor.to(dtype).contiguous()
    optional = {"lm_head.weight"} if config.tie_word_embeddings else set()
    missing = sorted(set(expected) - set(state) - set(blocks) - optional)
    if missing:
        raise CorruptCheckpointError(f"checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
    for name, bw in blocks.items():
        path = name.removesuffix(".weight")
        if path == "embed_tokens":
            model.embed_tokens = BlockQEmbedding(bw, dtype)
            if config.tie_word_embeddings and "lm_head.weight" not in state and "lm_head.weight" not in blocks:
                model.lm_head = BlockQLinear(bw)
        else:
            bias = state.pop(path + ".bias", None)
            model.set_submodule(path, BlockQLinear(bw, bias))
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings and "embed_tokens.weight" in state and "lm_head.weight" in blocks:
        raise CorruptCheckpointError("tied embedding is float but the lm_head is block-quantized")
    model.tie_weights()
    model.init_rope()
    return model.eval().requires_grad_(False)


def _is_gguf_file(path: Path) -> bool:
    if path.suffix.lower() == ".gguf":
        return True
    with path.open("rb") as f:
        return f.read(4) == b"GGUF"


def load_model(model: str | Path | None = None, dtype: str | torch.dtype = "auto",
               rope_type: str | None = None, keep_quantized: bool | None = None,
               adapter: str | Path | None = None) -> LoadedModel:
    """dtype: the activation dtype ("auto": per CPU, see parse_dtype). keep_quantized: GGUF Q4_0/Q4_1/Q8_0
    weights stay in their blocks and run on the int8-activation kernels; default: only with dtype "auto" (an
    explicit bf16/fp32/fp16 dequantizes every weight to that dtype, as does quantizing again with --quant).
    adapter: a PEFT LoRA folder, merged into float weights and wrapped around quantized ones
    (edgellm/lora.py)."""
    torch_dtype = parse_dtype(dtype)
    if keep_quantized is None:
        keep_quantized = dtype == "auto"
    path = resolve(model)
    if path.is_file() and path.suffix == ".safetensors" and (path.parent / "config.json").is_file():
        path = path.parent  # a weights file of an HF folder: load the folder
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if not (path / "config.json").is_file() and len(ggufs) == 1:
            path = ggufs[0]
    ckpt: GGUFCheckpoint | HFCheckpoint
    if path.is_file():
        if not _is_gguf_file(path):
            raise ModelNotFoundError(f"{path}: not a .gguf file or an HF model folder")
        ckpt = GGUFCheckpoint(path)
        tokenizer = Tokenizer.from_gguf_metadata(ckpt.metadata)
        fmt = "gguf"
    else:
        from ..quant.checkpoint import QuantizedCheckpoint, is_quantized_folder

        if is_quantized_folder(path):  # AutoAWQ "gemm" folder (ours or another tool's)
            ckpt = QuantizedCheckpoint(path)
            fmt = ckpt.format
        else:
            ckpt = HFCheckpoint(path)
            fmt = "hf"
        tokenizer = Tokenizer.from_hf_folder(path)
    config = ckpt.config
    if rope_type:
        config.with_rope_type(rope_type)
    if tokenizer.vocab_size > config.vocab_size:
        raise CorruptCheckpointError(
            f"tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary is {config.vocab_size}"
        )
    for e in tokenizer.eos_ids:
        if e not in config.eos_token_ids:
            config.eos_token_ids.append(e)
    tokenizer.eos_ids = list(config.eos_token_ids)
    if isinstance(ckpt, GGUFCheckpoint | HFCheckpoint):
        tensors = ckpt.tensors(torch_dtype, keep_quantized) if isinstance(ckpt, GGUFCheckpoint) else \
            ckpt.tensors(torch_dtype)
        net = build_model(config, tensors, torch_dtype)
    else:
        net = ckpt.build(torch_dtype)
    del ckpt  # closes the checkpoint's file mappings before the heap is trimmed
    if adapter is not None:
        from ..lora import apply_adapter

        apply_adapter(net, config, adapter)
    release_free_memory()  # the streamed temporaries' heap pages
    return LoadedModel(net, tokenizer, config, str(model) if model else "default", path, fmt,
                       str(adapter) if adapter is not None else None)
