"""Local HF folders: single and sharded safetensors, tokenizer.json, the chat template of
tokenizer_config.json, and generation_config.json's EOS ids merged into the model's."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import edgellm
from edgellm.errors import CorruptCheckpointError, InvalidArgumentError, ModelNotFoundError
from edgellm.loading import build_model, meta_transformer, skip_init
from edgellm.loading.hf_folder import HFCheckpoint

transformers = pytest.importorskip("transformers")
TEXT = "the quick brown fox jumps over the lazy dog"


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: 1 thread, restored after the module


def shard(folder: Path, dest: Path, n_shards: int = 3) -> Path:
    """Rewrite `folder`'s model.safetensors as `n_shards` files plus model.safetensors.index.json."""
    shutil.copytree(folder, dest, ignore=shutil.ignore_patterns("model.safetensors"))
    state = load_file(folder / "model.safetensors")
    names = sorted(state)
    weight_map = {}
    for i in range(n_shards):
        fname = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {k: state[k] for k in names[i::n_shards]}
        save_file(part, dest / fname, metadata={"format": "pt"})
        weight_map.update({k: fname for k in part})
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
             "weight_map": weight_map}
    (dest / "model.safetensors.index.json").write_text(json.dumps(index))
    return dest


@pytest.mark.parametrize("arch", ["llama", "qwen2", "phi3"])
def test_sharded_equals_single_file(tiny_checkpoints: dict[str, Path], tmp_path: Path, arch: str) -> None:
    single = tiny_checkpoints[arch]
    sharded = shard(single, tmp_path / "sharded")
    assert len(list(sharded.glob("*.safetensors"))) == 3
    a, b = edgellm.load(single, dtype="fp32"), edgellm.load(sharded, dtype="fp32")
    ids = a.tokenizer.encode(TEXT)
    assert torch.equal(a.logits(ids), b.logits(ids))
    ref = transformers.AutoModelForCausalLM.from_pretrained(sharded, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = ref(torch.tensor([ids])).logits[0]
    assert (b.logits(ids) - expected).abs().max().item() < 1e-4
    assert b.loaded.format == "hf" and b.loaded.path == sharded


def test_index_decides_which_shards_are_read(tiny_checkpoints: dict[str, Path], tmp_path: Path) -> None:
    sharded = shard(tiny_checkpoints["llama"], tmp_path / "sharded")
    # a stray file next to an index is ignored (e.g. Mistral's consolidated.safetensors)
    save_file({"junk": torch.zeros(2)}, sharded / "consolidated.safetensors")
    assert "junk" not in HFCheckpoint(sharded).index
    edgellm.load(sharded)
    # a shard named in the index but absent is reported by name
    (sharded / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CorruptCheckpointError, match="model-00002-of-00003.safetensors"):
        edgellm.load(sharded)


def test_missing_tensor_is_reported(tiny_checkpoints: dict[str, Path], tmp_path: Path) -> None:
    folder = shutil.copytree(tiny_checkpoints["llama"], tmp_path / "m")
    state = load_file(folder / "model.safetensors")
    del state["model.layers.1.mlp.down_proj.weight"]
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CorruptCheckpointError, match="down_proj"):
        edgellm.load(folder)


def test_extra_layer_is_reported(tiny_checkpoints: dict[str, Path], tmp_path: Path) -> None:
    folder = shutil.copytree(tiny_checkpoints["llama"], tmp_path / "m")
    state = load_file(folder / "model.safetensors")
    state["model.layers.7.mlp.down_proj.weight"] = state["model.layers.1.mlp.down_proj.weight"].clone()
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CorruptCheckpointError, match="layers.7"):
        edgellm.load(folder)


def test_tokenizer_and_chat_template_come_from_the_folder(tiny_checkpoints: dict[str, Path]) -> None:
    folder = tiny_checkpoints["llama"]
    llm = edgellm.load(folder)
    ref = transformers.AutoTokenizer.from_pretrained(folder)
    assert llm.tokenizer.encode(TEXT) == ref.encode(TEXT, add_special_tokens=False)
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"},
                {"role": "user", "content": "the fox"}]
    rendered = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == "<s>user: hello</s><s>assistant: hi</s><s>user: the fox</s><s>assistant:"
    assert llm.tokenizer.apply_chat_template(messages) == rendered
    assert llm.chat_prompt_ids(messages) == ref.encode(rendered, add_special_tokens=False)
    assert llm.tokenizer.eos_ids == [2] == llm.config.eos_token_ids


def test_generation_config_eos_ids_are_merged(tiny_checkpoints: dict[str, Path], tmp_path: Path) -> None:
    folder = shutil.copytree(tiny_checkpoints["llama"], tmp_path / "m")
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7, 9], "do_sample": True}))
    llm = edgellm.load(folder)
    assert sorted(llm.config.eos_token_ids) == [2, 7, 9]
    assert sorted(llm.tokenizer.eos_ids) == [2, 7, 9]
    assert llm.generator.tokenizer.eos_ids == llm.tokenizer.eos_ids
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": 11}))
    assert sorted(edgellm.load(folder).tokenizer.eos_ids) == [2, 11]


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_dtype(tiny_checkpoints: dict[str, Path], dtype: str) -> None:
    llm = edgellm.load(tiny_checkpoints["qwen2"], dtype=dtype)
    expected = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    assert {p.dtype for p in llm.model.parameters()} == {expected}
    assert llm.model.lm_head.weight is llm.model.embed_tokens.weight  # tied in the qwen2 tiny config
    assert not any(p.is_meta for p in llm.model.parameters())
    with pytest.raises(InvalidArgumentError):
        edgellm.load(tiny_checkpoints["qwen2"], dtype="fp8")


def test_weights_file_path_loads_its_folder(tiny_checkpoints: dict[str, Path]) -> None:
    folder = tiny_checkpoints["llama"]
    llm = edgellm.load(folder / "model.safetensors", dtype="fp32")
    assert llm.loaded.path == folder
    ids = llm.tokenizer.encode(TEXT)
    assert torch.equal(llm.logits(ids), edgellm.load(folder, dtype="fp32").logits(ids))


def test_folder_without_config(tmp_path: Path) -> None:
    save_file({"x": torch.zeros(1)}, tmp_path / "model.safetensors")
    with pytest.raises(ModelNotFoundError, match="config.json"):
        edgellm.load(tmp_path)


def test_skip_init_builds_meta_modules_and_restores_torch(tiny_checkpoints: dict[str, Path]) -> None:
    normal = torch.nn.init.normal_
    config = edgellm.load(tiny_checkpoints["llama"]).config
    model = meta_transformer(config)
    assert all(p.is_meta for p in model.parameters())
    assert torch.nn.init.normal_ is normal
    with pytest.raises(RuntimeError), skip_init():
        assert torch.nn.init.normal_ is not normal
        raise RuntimeError
    assert torch.nn.init.normal_ is normal
    t = torch.zeros(3)
    torch.nn.init.ones_(t)
    assert t.tolist() == [1.0, 1.0, 1.0]


def test_build_model_rejects_unknown_and_misshaped_tensors(tiny_checkpoints: dict[str, Path]) -> None:
    config = edgellm.load(tiny_checkpoints["llama"]).config
    with pytest.raises(CorruptCheckpointError, match="unexpected tensor 'bogus.weight'"):
        build_model(config, [("bogus.weight", torch.zeros(1))], torch.float32)
    with pytest.raises(CorruptCheckpointError, match=r"norm.weight.*shape \(3,\)"):
        build_model(config, [("norm.weight", torch.zeros(3))], torch.float32)
