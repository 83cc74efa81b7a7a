"""The public API: `llm = edgellm.load(...)`, then generate / stream / chat / logits."""

from __future__ import annotations

import operator
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from .config import ModelConfig
from .errors import ContextLengthError, InvalidArgumentError
from .generate import GenerationStats, Generator, SamplingParams
from .loading import LoadedModel, load_model
from .model import Transformer
from .speculative import Speculator, build_speculator, check_k, target_load_options
from .tokenizer import Tokenizer

Messages = list[dict[str, Any]]


class LLM:
    """A loaded model with its tokenizer. Create with `edgellm.load()`."""

    def __init__(self, loaded: LoadedModel, compile: bool | None = None, speculator: Speculator | None = None
                 ) -> None:
        self.loaded = loaded
        self.model: Transformer = loaded.model
        self.tokenizer: Tokenizer = loaded.tokenizer
        self.config: ModelConfig = loaded.config
        self.generator = Generator(self.model, self.tokenizer, self.config.max_seq_len, compile=compile,
                                   speculator=speculator)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def last_stats(self) -> GenerationStats:
        """Timing and token counts of the most recent generate/stream/chat call."""
        return self.generator.stats

    def __repr__(self) -> str:
        return f"LLM({self.loaded.source!r}, arch={self.config.arch}, dtype={self.dtype}, format={self.loaded.format})"

    # ------------------------------------------------------------------ text generation
    def _prompt_ids(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        try:
            if isinstance(prompt, str | bytes | dict) or any(isinstance(t, bool) for t in prompt):
                raise TypeError
            ids = [operator.index(t) for t in prompt]
        except TypeError:
            raise InvalidArgumentError(
                f"prompt must be a string or a list of token ids (got {type(prompt).__name__})"
            ) from None
        if any(not 0 <= t < self.config.vocab_size for t in ids):
            raise InvalidArgumentError(f"prompt token ids must be in [0, {self.config.vocab_size})")
        return ids

    def _start(self, ids: list[int], sampling: dict[str, Any]) -> Iterator[str]:
        """Validate everything up front (so bad input raises at the call, not at the first next()),
        then return the lazy text stream."""
        params = SamplingParams.from_kwargs(**sampling)
        self.generator.check_length(len(ids), params.max_new_tokens)
        return self.generator.text_stream(ids, params)

    def stream(self, prompt: str | list[int], **sampling: Any) -> Iterator[str]:
        """Yield the answer as it is generated, in UTF-8-safe text pieces."""
        return self._start(self._prompt_ids(prompt), sampling)

    def generate(self, prompt: str | list[int] | list[str] | list[list[int]], **sampling: Any) -> str | list[str]:
        """Complete one prompt (-> str) or several (-> list[str], run one after another)."""
        if isinstance(prompt, list | tuple) and prompt and all(isinstance(p, str | list) for p in prompt):
            SamplingParams.from_kwargs(**sampling)  # fail before the first prompt runs
            return [self.generate(p, **sampling) for p in prompt]  # type: ignore[misc]
        return "".join(self.stream(prompt, **sampling))  # type: ignore[arg-type]

    def chat_prompt_ids(self, messages: Messages) -> list[int]:
        if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and "role" in m for m in messages
        ):
            raise InvalidArgumentError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
        return self.tokenizer.encode_chat(messages, add_generation_prompt=True)

    def chat(self, messages: Messages, **sampling: Any) -> str:
        """Answer a conversation using the checkpoint's chat template."""
        return "".join(self.stream_chat(messages, **sampling))

    def stream_chat(self, messages: Messages, **sampling: Any) -> Iterator[str]:
        """`chat`, streamed in text pieces."""
        return self._start(self.chat_prompt_ids(messages), sampling)

    # ------------------------------------------------------------------ scoring
    @torch.inference_mode()
    def logits(self, ids: list[int] | torch.Tensor) -> torch.Tensor:
        """float32 logits (T, vocab) for a 1-D id sequence, one full causal forward pass (no cache)."""
        ids = torch.as_tensor(ids, dtype=torch.long)
        if ids.ndim != 1 or ids.numel() == 0:
            raise InvalidArgumentError("logits() takes a non-empty 1-D sequence of token ids")
        if ids.numel() > self.config.max_seq_len:
            raise ContextLengthError(f"{ids.numel()} tokens exceed the model's context of {self.config.max_seq_len}")
        if int(ids.max()) >= self.config.vocab_size or int(ids.min()) < 0:
            raise InvalidArgumentError(f"token ids must be in [0, {self.config.vocab_size})")
        return self.model(ids[None])[0].float()


def load(model: str | Path | None = None, dtype: str | torch.dtype = "auto", rope_type: str | None = None,
         compile: bool | None = None, keep_quantized: bool | None = None, speculative: str | None = None,
         draft_model: str | Path | None = None, draft_k: int | None = None,
         adapter: str | Path | None = None) -> LLM:
    """Load a model: None (bundled SmolLM2-135M-Instruct), a .gguf file, an HF folder or a hub id.

    compile: None (the default) decodes through the C step where the model allows it (block-quantized weights,
    e.g. a GGUF with dtype "auto": nothing to compile, same logits as eager) and eagerly otherwise; True also
    compiles a torch.compile'd step for other models (the CLI's default; first use compiles, later processes
    reuse the on-disk cache; eager without a C++ compiler); False is always eager.

    speculative: "lookup" (prompt n-gram lookup), "self" (the checkpoint's 4-bit weights draft for this
    higher-precision model: dtype "auto" then means an fp32 target, a GGUF's blocks dequantized), or "draft"
    (`draft_model`, same tokenizer); draft_k: tokens per draft, None = adaptive. See edgellm/speculative.py.

    adapter: a PEFT LoRA adapter folder (`edgellm finetune` writes them; PEFT's load too)."""
    if speculative is not None:
        check_k(draft_k)
        dtype, keep_quantized = target_load_options(speculative, dtype, keep_quantized)
    loaded = load_model(model, dtype=dtype, rope_type=rope_type, keep_quantized=keep_quantized, adapter=adapter)
    speculator = None
    if speculative is not None:
        speculator = build_speculator(speculative, loaded, k=draft_k, draft_model=draft_model, draft_dtype="auto",
                                      compile=compile)
    elif draft_model is not None or draft_k is not None:
        raise InvalidArgumentError("draft_model / draft_k need speculative= (lookup, self or draft)")
    return LLM(loaded, compile=compile, speculator=speculator)
