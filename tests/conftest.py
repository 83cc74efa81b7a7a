"""Shared fixtures: tiny random-weight checkpoints of every architecture, built on the fly, and the real
default model (loaded once per session)."""

from __future__ import annotations

import faulthandler
import json
import os
from pathlib import Path

import pytest
import torch

# CLI verbs default to the compiled decode step; tests run eager unless they ask for --compile.
os.environ.setdefault("EDGELLM_COMPILE", "0")

_crash_log = None


def pytest_configure(config: pytest.Config) -> None:
    """With EDGELLM_CRASH_LOG set (make test, with pytest's own faulthandler off), a crash (abort, segfault)
    writes the running test's id and every thread's stack to that file, which make test then prints last. Why:
    CI shows only the end of the output, where pytest's dump is its own frames and the list of loaded extension
    modules; the test that crashed and its frames were cut off (session 16's CI: "Fatal Python error: Aborted")."""
    global _crash_log
    path = os.environ.get("EDGELLM_CRASH_LOG")
    if path and _crash_log is None:
        _crash_log = open(path, "w")  # open for the whole run: faulthandler writes to its fd
        faulthandler.enable(file=_crash_log, all_threads=True)


def pytest_runtest_logstart(nodeid: str, location: tuple) -> None:
    if _crash_log is not None:  # the file holds the running test's id; a crash's dump follows it
        _crash_log.seek(0)
        _crash_log.truncate()
        _crash_log.write(f"pytest was running {nodeid}\n")
        _crash_log.flush()


DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"

TINY_BASE = dict(vocab_size=320, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                 rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)

TINY_CONFIGS = {
    "llama": dict(model_type="llama", rope_theta=10000.0, tie_word_embeddings=False),
    "llama3_rope": dict(model_type="llama", rope_theta=500000.0, tie_word_embeddings=True,
                        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
    "mistral": dict(model_type="mistral", rope_theta=10000.0, sliding_window=16, tie_word_embeddings=False),
    "phi3": dict(model_type="phi3", rope_theta=10000.0, tie_word_embeddings=False,
                 original_max_position_embeddings=256, pad_token_id=0),
    "qwen2": dict(model_type="qwen2", rope_theta=10000.0, tie_word_embeddings=True, use_sliding_window=False),
}


def random_llama(vocab: int, head_dim: int, dtype: torch.dtype, seed: int, hidden: int | None = None,
                 max_seq_len: int = 128):
    """An in-memory Llama Transformer (2 layers, 4 heads, 2 kv heads) with N(0, 0.1) weights, RoPE tables built,
    in `dtype`, eval mode: for tests of the model's own code paths (no checkpoint needed)."""
    from edgellm.config import ModelConfig
    from edgellm.model import Transformer

    cfg = ModelConfig(arch="llama", vocab_size=vocab, hidden_size=hidden or 4 * head_dim, intermediate_size=96,
                      num_layers=2, num_heads=4, num_kv_heads=2, head_dim=head_dim, max_seq_len=max_seq_len)
    torch.manual_seed(seed)
    model = Transformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.1 * torch.randn_like(p))
    model.init_rope()
    return model.to(dtype).eval()


def byte_level_tokenizer_json(vocab_size: int) -> str:
    """A byte-level BPE tokenizer.json with specials <unk>, <s>, </s> and a few merges, sized <= vocab_size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.trainers import BpeTrainer

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    text = ["the quick brown fox jumps over the lazy dog " * 3, "hello world, hello there " * 3]
    tok.train_from_iterator(text, trainer)
    return tok.to_str()


def make_hf_checkpoint(name: str, folder: Path, seed: int = 0) -> Path:
    """Save a random-weight HF model (safetensors) + tokenizer files into `folder`."""
    transformers = pytest.importorskip("transformers")
    cfg_dict = {**TINY_BASE, **TINY_CONFIGS[name]}
    config = transformers.AutoConfig.for_model(**cfg_dict)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32,
                                                          attn_implementation="eager")
    with torch.no_grad():  # spread the weights so logits are not near-uniform (ties would hide errors)
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif p.ndim == 1:
                p.normal_(0, 0.1)
            else:
                p.normal_(0, 0.08)
    model.save_pretrained(folder, safe_serialization=True)
    (folder / "tokenizer.json").write_text(byte_level_tokenizer_json(cfg_dict["vocab_size"]))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "add_bos_token": False,
        "chat_template": "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
                         "{% if add_generation_prompt %}<s>assistant:{% endif %}",
    }))
    return folder


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {name: make_hf_checkpoint(name, root / name, seed=i) for i, name in enumerate(TINY_CONFIGS)}


@pytest.fixture(scope="module")
def tiny_path(tiny_checkpoints: dict[str, Path]) -> str:
    """The tiny Llama checkpoint's folder, for tests that drive the CLI."""
    return str(tiny_checkpoints["llama"])


@pytest.fixture(scope="module")
def tiny(tiny_path: str):
    """The tiny Llama loaded in fp32."""
    import edgellm

    return edgellm.load(tiny_path, dtype="fp32")


@pytest.fixture(scope="session")
def default_gguf() -> Path:
    from edgellm.loading.default import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA_DIR.is_dir():
        pytest.skip(f"shared data not found at {DATA_DIR}")
    return DATA_DIR


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one torch thread (and shared CI cores are not oversubscribed); modules opt in
    with `pytestmark = pytest.mark.usefixtures("one_thread")`. The previous thread count is restored."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

