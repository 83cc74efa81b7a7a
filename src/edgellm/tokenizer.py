"""Text <-> token ids, chat templates and streaming detokenization.

Built on the `tokenizers` library (never on transformers, which is only a test-time reference).
A `Tokenizer` comes either from a Hugging Face folder (`tokenizer.json` + configs) or from GGUF
metadata, which we convert to a `tokenizers.Tokenizer` following llama.cpp's semantics:

* ``tokenizer.ggml.model == "gpt2"``: byte-level BPE. The pre-tokenizer is picked from
  ``tokenizer.ggml.pre`` the way llama.cpp's ``llama-vocab.cpp`` does (the split regexes decide which
  merges can ever apply, so getting them wrong silently changes ids). An unknown ``pre`` falls back to
  the plain GPT-2 regex without a warning, like llama.cpp's "default" type.
* ``tokenizer.ggml.model == "llama"``: SentencePiece-style BPE with byte fallback; merges come from
  the file or are derived from the vocabulary and scores (as transformers' SentencePieceExtractor).

BOS handling is ours, not the backend's: the backend never adds special tokens, and `encode` prepends
BOS at most once.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers

from .errors import TokenizerError

# GGUF token types (llama.cpp's llama_token_type).
_TT_NORMAL, _TT_UNKNOWN, _TT_CONTROL, _TT_USER_DEFINED, _TT_UNUSED, _TT_BYTE = 1, 2, 3, 4, 5, 6

# Tokens that close an assistant turn in common chat templates; they must stop generation too.
CHAT_END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")

# Split regexes from llama.cpp's llama-vocab.cpp / the models' own tokenizer.json files.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# llama.cpp runs "\p{N}" (every digit alone) before the GPT-2 regex for these vocabularies.
_DIGITS_THEN_GPT2 = frozenset({"smollm", "starcoder", "refact", "codeshell", "command-r", "exaone", "minerva"})
_LLAMA3_PRES = frozenset({"llama3", "llama-bpe", "llama-v3"})
_LLAMA3_REGEX_PRES = _LLAMA3_PRES | {"smaug-bpe", "dbrx"}
_QWEN2_PRES = frozenset({"qwen2", "deepseek-r1-qwen"})


@lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used to spell byte-level tokens."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def _gpt2_pre_tokenizer(pre: str | None) -> tuple[pre_tokenizers.PreTokenizer, bool]:
    """(pre-tokenizer, ignore_merges) for a byte-level vocabulary, chosen by `tokenizer.ggml.pre`."""
    if pre in _DIGITS_THEN_GPT2:
        return (
            pre_tokenizers.Sequence(
                [
                    pre_tokenizers.Digits(individual_digits=True),
                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
                ]
            ),
            False,
        )
    split = _LLAMA3_SPLIT if pre in _LLAMA3_REGEX_PRES else _QWEN2_SPLIT if pre in _QWEN2_PRES else None
    if split is not None:
        seq = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
            ]
        )
        # llama.cpp (and Llama 3's tokenizer.json) look a whole pre-token up in the vocab before merging.
        return seq, pre in _LLAMA3_PRES
    # 'default', 'gpt2', missing or unknown: the GPT-2 regex built into ByteLevel.
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True), False


def _derive_merges(tokens: Sequence[str], scores: Sequence[float]) -> list[tuple[str, str]]:
    """Merges implied by a SentencePiece vocabulary, ordered like transformers' `generate_merges`.

    Every split of a token into two in-vocab pieces becomes a merge ranked by the merged token's score
    (higher first), so BPE reproduces SentencePiece's "best scoring pair first" segmentation.
    """
    vocab = {t: i for i, t in enumerate(tokens)}
    token_scores = dict(zip(tokens, scores, strict=True))
    merges: list[tuple[str, str, float]] = []
    for merged, score in token_scores.items():
        local = [
            (merged[:k], merged[k:], score)
            for k in range(1, len(merged))
            if merged[:k] in vocab and merged[k:] in vocab
        ]
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        merges.extend(local)
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)  # stable, like transformers
    return [(a, b) for a, b, _ in merges]


def _split_merges(merges: Iterable[str]) -> list[tuple[str, str]]:
    out = []
    for m in merges:
        a, sep, b = m.partition(" ")
        if not sep:
            raise TokenizerError(f"malformed GGUF merge {m!r} (expected 'left right')")
        out.append((a, b))
    return out


def _token_content(value: Any) -> str | None:
    """A special token from tokenizer_config: a plain string or an AddedToken-style dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise TokenizerError(f"{path}: unreadable JSON ({e})") from e
    return data if isinstance(data, dict) else {}


def _pick_template(value: Any) -> str | None:
    """chat_template as stored in tokenizer_config: a string, or a list of {name, template} dicts."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        chosen = named.get("default") or next(iter(named.values()), None)
        return chosen if isinstance(chosen, str) else None
    return None


def _dedupe(ids: Iterable[int | None]) -> list[int]:
    out: list[int] = []
    for i in ids:
        if i is not None and i not in out:
            out.append(int(i))
    return out


@lru_cache(maxsize=16)
def _compile_template(template: str) -> Any:
    """Compile a chat template in the same sandbox, with the same helpers, as transformers."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(
        x: Any,
        ensure_ascii: bool = False,
        indent: Any = None,
        separators: Any = None,
        sort_keys: bool = False,
    ) -> str:
        # Jinja's builtin tojson HTML-escapes; templates expect plain json.dumps.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(template)


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the special-token and chat-template facts a runtime needs."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        eos_ids: Iterable[int] = (),
        pad_id: int | None = None,
        add_bos: bool = False,
        chat_template: str | None = None,
    ) -> None:
        self.backend = backend
        self.bos_token = bos_token
        self.bos_id = backend.token_to_id(bos_token) if bos_token is not None else None
        self.eos_token = eos_token
        eos_id = backend.token_to_id(eos_token) if eos_token is not None else None
        self.eos_ids = _dedupe([eos_id, *eos_ids])
        self.pad_id = pad_id
        self.add_bos = bool(add_bos) and self.bos_id is not None
        self.chat_template = chat_template

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_hf_folder(cls, path: str | Path) -> Tokenizer:
        """Load tokenizer.json (+ tokenizer_config.json, generation_config.json, chat_template.jinja)."""
        folder = Path(path)
        tj = folder / "tokenizer.json"
        if not tj.is_file():
            raise TokenizerError(f"cannot load tokenizer: no tokenizer.json in {folder}")
        try:
            backend = tokenizers.Tokenizer.from_file(str(tj))
        except Exception as e:  # tokenizers raises a bare Exception on bad/unsupported files
            raise TokenizerError(f"{tj}: cannot parse ({e})") from e
        cfg = _read_json(folder / "tokenizer_config.json")
        stm = _read_json(folder / "special_tokens_map.json")  # older repos keep special tokens here
        gen = _read_json(folder / "generation_config.json")

        def special(name: str) -> str | None:
            tok = _token_content(cfg.get(name)) or _token_content(stm.get(name))
            return tok if tok is not None and backend.token_to_id(tok) is not None else None

        bos, eos, pad = special("bos_token"), special("eos_token"), special("pad_token")
        bos_id = backend.token_to_id(bos) if bos is not None else None

        if "add_bos_token" in cfg:
            add_bos = bool(cfg["add_bos_token"])
        else:
            # No flag: the tokenizer.json post-processor tells whether the model expects BOS.
            with_special = backend.encode("a", add_special_tokens=True).ids
            plain = backend.encode("a", add_special_tokens=False).ids
            add_bos = bos_id is not None and len(with_special) > len(plain) and with_special[0] == bos_id

        template_file = folder / "chat_template.jinja"
        if template_file.is_file():  # transformers lets the standalone file win over the config entry
            template: str | None = template_file.read_text(encoding="utf-8")
        else:
            template = _pick_template(cfg.get("chat_template"))
            if template is None:
                template = _pick_template(_read_json(folder / "chat_template.json").get("chat_template"))

        gen_eos = gen.get("eos_token_id")
        extra_eos = list(gen_eos) if isinstance(gen_eos, list) else [gen_eos]
        specials = {t.content for t in backend.get_added_tokens_decoder().values() if t.special}
        extra_eos += [backend.token_to_id(t) for t in CHAT_END_TOKENS if t in specials and template and t in template]
        pad_id = backend.token_to_id(pad) if pad is not None else gen.get("pad_token_id")
        return cls(
            backend,
            bos_token=bos,
            eos_token=eos,
            eos_ids=_dedupe(extra_eos),
            pad_id=pad_id if isinstance(pad_id, int) else None,
            add_bos=add_bos,
            chat_template=template,
        )

    @classmethod
    def from_gguf(cls, path: str | Path) -> Tokenizer:
        """Convenience: read a GGUF file's metadata and build from it."""
        from .loading.gguf_meta import open_gguf, read_metadata

        return cls.from_gguf_metadata(read_metadata(open_gguf(path)))

    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any]) -> Tokenizer:
        """Build from GGUF key/value metadata (see module docstring for the conversion rules)."""
        kind = meta.get("tokenizer.ggml.model")
        if kind not in ("gpt2", "llama"):
            raise TokenizerError(f"unsupported GGUF tokenizer type {kind!r} (supported: 'gpt2', 'llama')")
        tokens: list[str] | None = meta.get("tokenizer.ggml.tokens")
        if not tokens:
            raise TokenizerError("GGUF metadata has no tokenizer.ggml.tokens")
        types: list[int] = list(meta.get("tokenizer.ggml.token_type") or [_TT_NORMAL] * len(tokens))
        if len(types) != len(tokens):
            raise TokenizerError("GGUF tokenizer.ggml.token_type and tokens differ in length")

        if kind == "gpt2":
            backend = cls._gguf_byte_level(meta, tokens, types)
            default_add_bos = False  # transformers' GPT2Tokenizer default; real files set the flag anyway
        else:
            backend = cls._gguf_sentencepiece(meta, tokens)
            default_add_bos = True  # llama.cpp adds BOS to SentencePiece vocabularies unless told not to

        # Control tokens are matched whole in text and skippable on decode; user-defined ones are
        # matched whole but are ordinary text. The vocab keeps their raw spelling, so ids line up.
        # <unk> of a SentencePiece vocab is treated like a control token, as llama.cpp does.
        special_types = {_TT_CONTROL, _TT_UNKNOWN} if kind == "llama" else {_TT_CONTROL}
        zipped = list(zip(tokens, types, strict=True))
        backend.add_special_tokens(
            [AddedToken(t, normalized=False, special=True) for t, tt in zipped if t and tt in special_types]
        )
        backend.add_tokens(
            [AddedToken(t, normalized=False, special=False) for t, tt in zipped if t and tt == _TT_USER_DEFINED]
        )

        def tok(key: str) -> str | None:
            i = meta.get(f"tokenizer.ggml.{key}")
            return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None

        template = meta.get("tokenizer.chat_template")
        template = template if isinstance(template, str) else None
        extra = [meta.get("tokenizer.ggml.eot_token_id"), meta.get("tokenizer.ggml.eom_token_id")]
        index = {t: i for i, t in enumerate(tokens)}
        for t in CHAT_END_TOKENS:
            if template and t in template and t in index and types[index[t]] == _TT_CONTROL:
                extra.append(index[t])
        pad_id = meta.get("tokenizer.ggml.padding_token_id")
        return cls(
            backend,
            bos_token=tok("bos_token_id"),
            eos_token=tok("eos_token_id"),
            eos_ids=_dedupe(i for i in extra if isinstance(i, int)),
            pad_id=pad_id if isinstance(pad_id, int) else None,
            add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", default_add_bos)),
            chat_template=template,
        )

    @staticmethod
    def _gguf_byte_level(meta: dict[str, Any], tokens: list[str], types: list[int]) -> tokenizers.Tokenizer:
        merges = meta.get("tokenizer.ggml.merges")
        if merges is None:
            raise TokenizerError("GGUF gpt2 tokenizer has no tokenizer.ggml.merges")
        alphabet = set(_bytes_to_unicode().values())
        spell = _bytes_to_unicode()
        vocab: dict[str, int] = {}
        for i, (t, tt) in enumerate(zip(tokens, types, strict=True)):
            # Normal tokens must be in the byte alphabet; a few converters store raw text, so respell it.
            if tt == _TT_NORMAL and not set(t) <= alphabet:
                t = "".join(spell[b] for b in t.encode("utf-8"))
            vocab[t] = i
        pre, ignore_merges = _gpt2_pre_tokenizer(meta.get("tokenizer.ggml.pre"))
        bpe = models.BPE(
            vocab=vocab,
            merges=_split_merges(merges),
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
            ignore_merges=ignore_merges,
        )
        backend = tokenizers.Tokenizer(bpe)
        backend.pre_tokenizer = pre
        backend.decoder = decoders.ByteLevel()
        return backend

    @staticmethod
    def _gguf_sentencepiece(meta: dict[str, Any], tokens: list[str]) -> tokenizers.Tokenizer:
        vocab = {t: i for i, t in enumerate(tokens)}
        if meta.get("tokenizer.ggml.merges"):
            merges = _split_merges(meta["tokenizer.ggml.merges"])
        else:
            scores = meta.get("tokenizer.ggml.scores")
            if scores is None or len(scores) != len(tokens):
                raise TokenizerError("GGUF llama tokenizer needs tokenizer.ggml.scores (one per token)")
            merges = _derive_merges(tokens, [float(s) for s in scores])
        unk_id = meta.get("tokenizer.ggml.unknown_token_id")
        unk = tokens[unk_id] if isinstance(unk_id, int) and 0 <= unk_id < len(tokens) else "<unk>"
        bpe = models.BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            unk_token=unk if unk in vocab else None,
            fuse_unk=True,
            byte_fallback=True,
        )
        backend = tokenizers.Tokenizer(bpe)
        prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
        norms: list[normalizers.Normalizer] = [normalizers.Prepend("▁")] if prefix else []
        backend.normalizer = normalizers.Sequence([*norms, normalizers.Replace(" ", "▁")])
        decs: list[decoders.Decoder] = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        if prefix:  # undo the prepended space, once, at the start of the decoded text
            decs.append(decoders.Strip(" ", 1, 0))
        backend.decoder = decoders.Sequence(decs)
        return backend

    # ------------------------------------------------------------------ encode / decode
    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(int(token_id))

    def _with_bos(self, text: str, ids: list[int], add_bos: bool | None) -> list[int]:
        add = self.add_bos if add_bos is None else add_bos
        if not add or self.bos_id is None:
            return ids
        # Never double BOS: the text (e.g. a rendered chat template) may already carry it.
        if (self.bos_token and text.startswith(self.bos_token)) or (ids and ids[0] == self.bos_id):
            return ids
        return [self.bos_id, *ids]

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`, with BOS if `add_bos` (default `self.add_bos`) and not already there."""
        ids = self.backend.encode(text, add_special_tokens=False).ids
        return self._with_bos(text, ids, add_bos)

    def encode_batch(self, texts: Sequence[str], add_bos: bool | None = None) -> list[list[int]]:
        """`encode` over many texts at once (parallel in the Rust backend)."""
        encs = self.backend.encode_batch(list(texts), add_special_tokens=False)
        return [self._with_bos(t, e.ids, add_bos) for t, e in zip(texts, encs, strict=True)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------ chat
    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        """Render `messages` with the model's chat template, exactly as transformers would."""
        if not self.chat_template:
            raise TokenizerError("this tokenizer has no chat template")
        import jinja2

        # transformers always defines tools/documents (as None); templates test `tools is not none`.
        variables: dict[str, Any] = {
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": self.id_to_token(self.pad_id) if self.pad_id is not None else None,
            "tools": None,
            "documents": None,
            **kwargs,
        }

        try:
            return _compile_template(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt, **variables
            )
        except jinja2.TemplateError as e:
            raise TokenizerError(f"chat template failed: {e}") from e

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        """Render then encode; BOS is added (if the model wants it) only if the template did not write it."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt))

    def stream_decoder(self, skip_special_tokens: bool = False) -> StreamDecoder:
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens)


class StreamDecoder:
    """Incremental detokenizer (text-generation-inference's prefix_offset/read_offset scheme).

    Each push decodes only a short window: the tokens since the last emitted boundary plus a few
    before it (as context, because decoders such as SentencePiece's strip/space rules depend on the
    neighbouring token), and emits the difference. Text ending in U+FFFD is an incomplete UTF-8
    sequence, so it is held back until the next token completes it.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix_offset = 0  # start of the context window
        self._read_offset = 0  # everything before this has been emitted

    def _decode(self, ids: list[int]) -> str:
        return self._tok.backend.decode(ids, skip_special_tokens=self._skip)

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes (possibly '')."""
        self._ids.append(int(token_id))
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
            # Drop ids that can no longer be part of a window, so memory stays bounded.
            if self._prefix_offset > 0:
                del self._ids[: self._prefix_offset]
                self._read_offset -= self._prefix_offset
                self._prefix_offset = 0
            return new_text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        """Emit whatever is still held back (e.g. a trailing incomplete byte sequence) and reset."""
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        self._ids, self._prefix_offset, self._read_offset = [], 0, 0
        return new_text[len(prefix_text) :]
