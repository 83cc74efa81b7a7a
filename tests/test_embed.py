"""Embeddings (edgellm/embed.py): parity with transformers (mean-pooled / last-token last_hidden_state, fp32,
L2-normalised) on tiny random models and the default model, harmless right-padding, base64, and the
`embed` / `similarity` verbs."""

from __future__ import annotations

import base64
import io
import json
import struct
import sys

import pytest
import torch
import torch.nn.functional as F

import edgellm
from edgellm.cli import main
from edgellm.embed import cosine_matrix, embed_ids, embed_texts, to_base64, tokenize_texts
from edgellm.errors import ContextLengthError, InvalidArgumentError

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

# different lengths (1 to ~40 tokens on the tiny tokenizer): one padded batch holds them all
TEXTS = [
    "the quick brown fox",
    "x",
    "hello world, hello there! Zebras quietly vex 42 jumpy kangaroos; the lazy dog sleeps again.",
    "the lazy dog",
    "hello there",
]
TOL = 1e-4


def reference(hf: torch.nn.Module, batch_ids: list[list[int]], pooling: str) -> torch.Tensor:
    """transformers, one unpadded sequence at a time: last_hidden_state pooled, L2-normalised, fp32."""
    rows = []
    with torch.no_grad():
        for ids in batch_ids:
            h = hf(torch.tensor([ids])).last_hidden_state[0].float()  # (T, C)
            rows.append(F.normalize(h.mean(0) if pooling == "mean" else h[-1], dim=-1))
    return torch.stack(rows)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape and a.dtype == b.dtype == torch.float32
    return (a - b).abs().max().item()


def padding_effects(llm: edgellm.LLM, batch_ids: list[list[int]]) -> tuple[float, float, float]:
    """Hidden states of the real positions of a right-padded batch: (max |diff| against the same batch padded
    with other (random) ids, max |diff| against each sequence run unpadded alone, max |hidden state|)."""
    lens = torch.tensor([len(x) for x in batch_ids])
    real = torch.arange(int(lens.max()))[None, :] < lens[:, None]         # (B, T)
    zeros = torch.zeros(real.shape, dtype=torch.long)
    noise = torch.randint(3, llm.config.vocab_size, real.shape, generator=torch.Generator().manual_seed(0))
    for b, x in enumerate(batch_ids):
        zeros[b, :len(x)] = noise[b, :len(x)] = torch.tensor(x)
    with torch.inference_mode():
        h = llm.model(zeros, hidden_only=True)
        pads = (h - llm.model(noise, hidden_only=True))[real].abs().max().item()
        alone = max((h[b, :len(x)] - llm.model(torch.tensor([x]), hidden_only=True)[0]).abs().max().item()
                    for b, x in enumerate(batch_ids))
    return pads, alone, h[real].abs().max().item()


# ---------------------------------------------------------------------------------------------- tiny models
@pytest.fixture(scope="module", params=["llama", "mistral"])  # mistral: a 16-token sliding window
def tiny_pair(request, tiny_checkpoints):
    path = tiny_checkpoints[request.param]
    hf = transformers.AutoModel.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    return request.param, edgellm.load(path, dtype="fp32"), hf




def test_padded_hidden_states_equal_unpadded(tiny_pair):
    name, ours, _ = tiny_pair
    ids = tokenize_texts(ours, TEXTS)
    assert len({len(x) for x in ids}) == len(ids) and max(len(x) for x in ids) > 16, ids
    pads, alone, _ = padding_effects(ours, ids)
    print(f"\n{name}: hidden states, max |diff| other pads {pads:.1e}, padded vs alone {alone:.1e}")
    assert pads <= 1e-6 and alone <= 1e-5


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_embeddings_match_transformers(tiny_pair, pooling):
    name, ours, hf = tiny_pair
    got = embed_texts(ours, TEXTS, pooling=pooling)                 # one right-padded batch
    expected = reference(hf, tokenize_texts(ours, TEXTS), pooling)
    d = max_diff(got, expected)
    print(f"\n{name} {pooling}: max |ours - transformers| {d:.2e}")
    assert d <= TOL
    assert torch.allclose(got.norm(dim=-1), torch.ones(len(TEXTS)), atol=1e-6)


def test_batch_size_and_order_do_not_change_the_result(tiny):
    full = embed_texts(tiny, TEXTS)
    for bs in (1, 2, 3):
        assert max_diff(embed_texts(tiny, TEXTS, batch_size=bs), full) <= 1e-5
    rev = embed_texts(tiny, TEXTS[::-1])
    assert max_diff(rev.flip(0), full) <= 1e-5


def test_unnormalized_is_the_plain_pool(tiny):
    ids = tokenize_texts(tiny, TEXTS[:2])
    raw = embed_ids(tiny.model, ids, "mean", normalize=False)
    with torch.inference_mode():
        h = tiny.model(torch.tensor([ids[0]]), hidden_only=True)[0]
    assert max_diff(raw[0], h.mean(0)) <= 1e-5
    assert max_diff(F.normalize(raw, dim=-1), embed_ids(tiny.model, ids)) <= 1e-6


def test_bad_input_is_a_one_line_error(tiny):
    with pytest.raises(InvalidArgumentError, match="non-empty list"):
        embed_texts(tiny, [])
    with pytest.raises(InvalidArgumentError, match="non-empty list"):
        embed_texts(tiny, "a bare string")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="input 1 is an empty string"):
        embed_texts(tiny, ["ok", ""])
    with pytest.raises(InvalidArgumentError, match="input 0 is int"):
        embed_texts(tiny, [3])  # type: ignore[list-item]
    with pytest.raises(InvalidArgumentError, match="pooling"):
        embed_texts(tiny, ["ok"], pooling="max")
    with pytest.raises(InvalidArgumentError, match="at least one token"):
        embed_ids(tiny.model, [[5], []])
    long = " ".join(f"w{i}" for i in range(300))
    n = len(tiny.tokenizer.encode(long))
    with pytest.raises(ContextLengthError, match=f"input 1 has {n} tokens.*context of 256") as e:
        embed_texts(tiny, ["ok", long])
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------- base64, cosine
def test_base64_is_little_endian_float32(tiny):
    assert to_base64(torch.tensor([1.0, -2.5, 0.1])) == base64.b64encode(struct.pack("<3f", 1.0, -2.5, 0.1)).decode()
    np = pytest.importorskip("numpy")
    for vec in embed_texts(tiny, TEXTS[:3]):
        decoded = np.frombuffer(base64.b64decode(to_base64(vec)), dtype="<f4")  # what the openai client does
        assert decoded.tolist() == vec.tolist()
    with pytest.raises(InvalidArgumentError):
        to_base64(torch.zeros(2, 2))


def test_cosine_matrix():
    emb = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0], [-1.0, 0.0]])
    expected = torch.tensor([[1.0, 1, 0, -1], [1, 1, 0, -1], [0, 0, 1, 0], [-1, -1, 0, 1]])
    assert torch.allclose(cosine_matrix(emb), expected)


# ---------------------------------------------------------------------------------------------- default model
@pytest.fixture(scope="module")
def default_pair():
    """The bundled model in fp32 and a transformers LlamaModel holding the same (dequantized) weights. Copying
    them is ~20x faster than transformers' own GGUF loader (~12 s); the loaders themselves are compared in
    tests/test_default_model.py."""
    ours = edgellm.load(None, dtype="fp32")
    c = ours.config
    if c.arch != "llama" or c.rope_scaling or c.rope_freq_factors or c.sliding_window or c.attention_bias:
        pytest.skip(f"the default model is not a plain Llama ({c.arch})")
    cfg = transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
        head_dim=c.head_dim, max_position_embeddings=c.max_seq_len, rms_norm_eps=c.rms_norm_eps,
        rope_theta=c.rope_theta, tie_word_embeddings=c.tie_word_embeddings, attn_implementation="eager")
    sd = {}
    for k, v in ours.model.state_dict().items():
        if k.endswith("qkv_proj.weight"):
            q, kk, vv = v.split([c.q_size, c.kv_size, c.kv_size])
            sd |= {k.replace("qkv_proj", "q_proj"): q, k.replace("qkv_proj", "k_proj"): kk,
                   k.replace("qkv_proj", "v_proj"): vv}
        elif k.endswith("gate_up_proj.weight"):
            g, u = v.chunk(2)
            sd |= {k.replace("gate_up_proj", "gate_proj"): g, k.replace("gate_up_proj", "up_proj"): u}
        elif not k.startswith("lm_head"):
            sd[k] = v
    with torch.device("meta"):
        hf = transformers.LlamaModel(cfg)
    hf.load_state_dict(sd, strict=True, assign=True)
    hf.rotary_emb = type(hf.rotary_emb)(cfg)  # its inv_freq buffer was built on the meta device
    return ours, hf.float().eval()


DEFAULT_TEXTS = [
    "The capital of France is Paris.",
    "Hi",
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
    "Photosynthesis converts light energy into chemical energy stored in glucose. " * 4,
    "Les chats sont des animaux très indépendants.",
]


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_default_model_embeddings_match_transformers(default_pair, pooling):
    ours, hf = default_pair
    ids = tokenize_texts(ours, DEFAULT_TEXTS)
    got = embed_ids(ours.model, ids, pooling)
    d = max_diff(got, reference(hf, ids, pooling))
    print(f"\ndefault model {pooling}: max |ours - transformers| {d:.2e} (token counts {[len(x) for x in ids]})")
    assert d <= TOL


def test_default_model_padding_is_harmless(default_pair):
    """Head dim 64: the prefill takes the C attention kernel where this CPU has it, SDPA elsewhere. The pads'
    content changes nothing; against unpadded runs the hidden states (|h| up to ~50) differ by fp32 rounding
    only (measured ~2e-6 relative: a 1-token input alone takes SDPA, not the kernel, and SDPA's blocking
    depends on T), so that bound is relative; the pooled unit vectors still match transformers within 1e-6."""
    ours, _ = default_pair
    pads, alone, scale = padding_effects(ours, tokenize_texts(ours, DEFAULT_TEXTS))
    print(f"\ndefault model: hidden states, max |diff| other pads {pads:.1e}, padded vs alone {alone:.1e} "
          f"(max |h| {scale:.1f})")
    assert pads <= 1e-6 and alone <= 1e-5 * scale


# ---------------------------------------------------------------------------------------------- CLI
def run(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    assert rc == 0, err
    return out


def fails(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    assert main(list(argv)) == 2
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_cli_embed_json(capsys, tiny, tiny_path):
    texts = ["the quick brown fox", "the quick brown fox", "hello"]
    data = json.loads(run(capsys, "embed", *texts, "--model", tiny_path, "--dtype", "fp32", "--json"))
    assert data["pooling"] == "mean" and data["dim"] == 64 and data["model"] == tiny_path
    assert [d["index"] for d in data["data"]] == [0, 1, 2] and [d["text"] for d in data["data"]] == texts
    emb = torch.tensor([d["embedding"] for d in data["data"]])
    assert max_diff(emb, embed_texts(tiny, texts)) <= 1e-6
    assert data["data"][2]["tokens"] == len(tiny.tokenizer.encode("hello"))

    last = json.loads(run(capsys, "embed", "hello", "-m", tiny_path, "--dtype", "fp32", "--json",
                          "--pooling", "last", "--no-normalize"))
    vec = torch.tensor(last["data"][0]["embedding"])
    assert last["pooling"] == "last" and abs(vec.norm().item() - 1) > 1e-3
    assert max_diff(F.normalize(vec, dim=0), embed_texts(tiny, ["hello"], pooling="last")[0]) <= 1e-5


def test_cli_embed_text_lines_and_stdin(capsys, monkeypatch, tiny_path):
    out = run(capsys, "embed", "hello", "the lazy dog", "-m", tiny_path, "--dtype", "fp32")
    lines = out.splitlines()
    assert len(lines) == 2 and "dim 64" in lines[0] and lines[1].lstrip().startswith("1 ")
    assert lines[0].count(",") == 6  # six values, then "..."
    monkeypatch.setattr(sys, "stdin", io.StringIO("first line\n\nsecond line\n"))
    data = json.loads(run(capsys, "embed", "-m", tiny_path, "--dtype", "fp32", "--json"))
    assert [d["text"] for d in data["data"]] == ["first line", "second line"]


def test_cli_similarity(capsys, tiny_path):
    texts = ["the quick brown fox", "hello there", "the quick brown fox"]
    data = json.loads(run(capsys, "similarity", *texts, "-m", tiny_path, "--dtype", "fp32", "--json"))
    sim = torch.tensor(data["matrix"])
    assert sim.shape == (3, 3) and data["texts"] == texts
    assert abs(sim[0, 2].item() - 1) <= 1e-5 and torch.allclose(sim, sim.T) and sim[0, 1] < 1 - 1e-4
    assert torch.allclose(sim.diagonal(), torch.ones(3), atol=1e-5)

    long = "a text much longer than twenty-four characters"
    table = run(capsys, "similarity", long, "hello", "-m", tiny_path, "--dtype", "fp32").splitlines()
    assert len(table) == 4 and len({len(line) for line in table}) == 1  # aligned columns
    assert "| 0: a text much longer than… |" in table[0] and long not in table[0]


def test_cli_errors_are_one_line(capsys, tiny_path):
    err = fails(capsys, "embed", "ok", "", "-m", tiny_path, "--dtype", "fp32")
    assert "input 1 is an empty string" in err
    long = " ".join(f"w{i}" for i in range(300))
    err = fails(capsys, "similarity", "ok", long, "-m", tiny_path, "--dtype", "fp32")
    assert "input 1 has" in err and "256" in err
    assert "must be >= 1" in fails(capsys, "embed", "ok", "-m", tiny_path, "--batch-size", "0")


def test_cli_plot(capsys, monkeypatch, tmp_path, tiny_path):
    png = tmp_path / "sim.png"
    args = ("similarity", "hello", "the lazy dog", "-m", tiny_path, "--dtype", "fp32", "--plot", str(png))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "pip install matplotlib" in fails(capsys, *args)
        assert not png.exists()
        return
    run(capsys, *args)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    assert "pip install matplotlib" in fails(capsys, *args)
