"""Constrained decoding for `response_format` (json_object, json_schema) through llguidance.

llguidance (guidance-ai; also behind llama.cpp's and vLLM's structured output) compiles a JSON schema into a
grammar and, at each step, gives the set of tokens that keep the output a valid prefix. We turn that set into
a mask over the logits before sampling; EOS is allowed exactly when the document is complete.
"""

from __future__ import annotations

import json
from typing import Any

import torch

from ..errors import InvalidArgumentError
from ..tokenizer import Tokenizer


class GrammarFactory:
    """Builds one matcher per request; the tokenizer table (~1 s to build) is made once, on first use."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._lltok = None

    def _ll_tokenizer(self) -> Any:
        if self._lltok is None:
            import llguidance

            self._lltok = llguidance.LLTokenizer(self.tokenizer.backend.to_str(), n_vocab=self.vocab_size,
                                                 eos_token=list(self.tokenizer.eos_ids))
        return self._lltok

    def grammar_for(self, response_format: dict[str, Any] | None) -> str | None:
        """The llguidance grammar of an OpenAI `response_format`, or None for plain text."""
        import llguidance

        if not response_format or response_format.get("type") in (None, "text"):
            return None
        kind = response_format.get("type")
        if kind == "json_object":
            schema: Any = {"type": "object"}
        elif kind == "json_schema":
            spec = response_format.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
                raise InvalidArgumentError("response_format.json_schema must be an object with a 'schema' object")
            schema = spec.get("schema") or {"type": "object"}
        else:
            raise InvalidArgumentError(f"response_format.type must be text, json_object or json_schema (got {kind!r})")
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema))
            llguidance.LLMatcher.validate_grammar(grammar, self._ll_tokenizer())
        except Exception as e:  # llguidance reports unsupported or malformed schemas as exceptions
            raise InvalidArgumentError(f"response_format: unsupported JSON schema ({str(e).splitlines()[0]})") from None
        return grammar

    def matcher(self, grammar: str) -> Matcher:
        return Matcher(self._ll_tokenizer(), grammar, self.vocab_size)


class Matcher:
    """One request's grammar state: `mask()` before sampling, `consume(token)` after."""

    def __init__(self, lltok: Any, grammar: str, vocab_size: int) -> None:
        import llguidance

        self.m = llguidance.LLMatcher(lltok, grammar, log_level=0)
        self.vocab_size = vocab_size
        self._bits = torch.arange(32, dtype=torch.int32)

    def mask(self) -> torch.Tensor:
        """(V,) bool: True where the token keeps the output valid."""
        words = torch.frombuffer(bytearray(self.m.compute_bitmask()), dtype=torch.int32)  # (ceil(V/32),)
        return ((words[:, None] >> self._bits) & 1).flatten()[:self.vocab_size].bool()

    def consume(self, token: int) -> None:
        self.m.consume_token(token)

    @property
    def error(self) -> str | None:
        return self.m.get_error() if self.m.is_error() else None
