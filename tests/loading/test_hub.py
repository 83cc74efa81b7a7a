"""Hub ids resolve through huggingface_hub's cache: with HF_HUB_OFFLINE=1 a cached `org/name` (or
`org/name:file.gguf`) loads exactly like the local files, and an uncached one is a clear ModelNotFoundError."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch

import edgellm
from edgellm.cli import main
from edgellm.errors import ModelNotFoundError
from edgellm.loading import resolve
from edgellm.loading.hub import looks_like_hub_id
from tests.loading.gguf_convert import hf_to_gguf

COMMIT = "0123456789abcdef0123456789abcdef01234567"
TEXT = "the quick brown fox"


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: 1 thread, restored after the module


def add_to_cache(cache: Path, repo: str, files: dict[str, Path], commit: str = COMMIT) -> Path:
    """Lay files out as huggingface_hub does: blobs/<sha256>, snapshots/<commit>/<name> -> blob, refs/main."""
    repo_dir = cache / f"models--{repo.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / commit
    (repo_dir / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for name, src in files.items():
        data = src.read_bytes()
        blob = repo_dir / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / "main").write_text(commit)
    return snapshot


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An offline hub whose cache lives in tmp_path (env and the already-imported constants both patched)."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


@pytest.fixture
def cached_tiny(hub_cache: Path, tiny_checkpoints: dict[str, Path]) -> tuple[Path, Path]:
    folder = tiny_checkpoints["llama"]
    files = {p.name: p for p in folder.iterdir() if p.is_file()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(files)
    return folder, add_to_cache(hub_cache, "tiny-org/tiny-llama", files)


def test_cached_hub_id_loads_like_the_folder(cached_tiny: tuple[Path, Path]) -> None:
    folder, snapshot = cached_tiny
    from_hub = edgellm.load("tiny-org/tiny-llama", dtype="fp32")
    from_folder = edgellm.load(folder, dtype="fp32")
    assert from_hub.loaded.path == snapshot
    assert from_hub.loaded.source == "tiny-org/tiny-llama"
    ids = from_folder.tokenizer.encode(TEXT)
    assert from_hub.tokenizer.encode(TEXT) == ids
    assert torch.equal(from_hub.logits(ids), from_folder.logits(ids))
    assert from_hub.generate(TEXT, max_new_tokens=8) == from_folder.generate(TEXT, max_new_tokens=8)
    assert from_hub.tokenizer.chat_template == from_folder.tokenizer.chat_template


def test_cached_hub_id_from_the_cli(cached_tiny: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    folder, _ = cached_tiny
    assert main(["generate", "--model", "tiny-org/tiny-llama", "--dtype", "fp32", "-n", "6", TEXT]) == 0
    from_hub = capsys.readouterr().out
    assert main(["generate", "--model", str(folder), "--dtype", "fp32", "-n", "6", TEXT]) == 0
    assert capsys.readouterr().out == from_hub
    assert main(["info", "--model", "tiny-org/tiny-llama"]) == 0
    assert "Parameters: " in capsys.readouterr().out


def test_uncached_hub_id_offline_is_model_not_found(cached_tiny: tuple[Path, Path], hub_cache: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    for model in ("tiny-org/not-cached", "tiny-org/tiny-llama:absent.gguf", "other/model:x.gguf"):
        with pytest.raises(ModelNotFoundError) as info:
            edgellm.load(model)
        message = str(info.value)
        assert model in message and "offline" in message.lower() and str(hub_cache) in message
        assert "\n" not in message
        assert main(["generate", "--model", model, "hello"]) == 2
        out, err = capsys.readouterr()
        assert err.startswith("edgellm generate: error: ") and err.count("\n") == 1 and model in err
        assert "Traceback" not in err and out == ""


def test_hub_repo_without_config(hub_cache: Path, tiny_checkpoints: dict[str, Path]) -> None:
    add_to_cache(hub_cache, "org/gguf-only", {"README.json": tiny_checkpoints["llama"] / "tokenizer_config.json"})
    with pytest.raises(ModelNotFoundError, match=r"org/gguf-only:<file>\.gguf"):
        edgellm.load("org/gguf-only")


def test_hub_gguf_file(hub_cache: Path, tiny_checkpoints: dict[str, Path], tmp_path: Path,
                       capsys: pytest.CaptureFixture[str]) -> None:
    gguf_path = hf_to_gguf(tiny_checkpoints["llama"], tmp_path / "tiny-f32.gguf")
    snapshot = add_to_cache(hub_cache, "org/tiny-GGUF", {"tiny-f32.gguf": gguf_path,
                                                         "sub/other.gguf": gguf_path})
    assert resolve("org/tiny-GGUF:tiny-f32.gguf") == snapshot / "tiny-f32.gguf"
    assert resolve("org/tiny-GGUF:sub/other.gguf") == snapshot / "sub" / "other.gguf"
    from_hub = edgellm.load("org/tiny-GGUF:tiny-f32.gguf", dtype="fp32")
    from_file = edgellm.load(gguf_path, dtype="fp32")
    assert from_hub.loaded.format == "gguf"
    ids = from_file.tokenizer.encode(TEXT)
    assert torch.equal(from_hub.logits(ids), from_file.logits(ids))
    assert main(["info", "--model", "org/tiny-GGUF:tiny-f32.gguf"]) == 0
    hub_info = capsys.readouterr().out
    assert main(["info", "--model", str(gguf_path)]) == 0
    assert capsys.readouterr().out == hub_info


@pytest.mark.parametrize(("value", "expected"), [
    ("org/name", True), ("HuggingFaceTB/SmolLM2-135M-Instruct", True), ("org/name:model.Q4_K_M.gguf", True),
    ("org/name:dir/model.gguf", True), ("meta-llama/Llama-3.1-8B", True),
    ("./org/name", False), ("/abs/path", False), ("~/models/x", False), ("name", False), ("a/b/c", False),
    ("org/name:file.bin", False), ("", False),
])
def test_looks_like_hub_id(value: str, expected: bool) -> None:
    assert looks_like_hub_id(value) is expected


def test_local_path_wins_over_hub_id(tiny_checkpoints: dict[str, Path], tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch, hub_cache: Path) -> None:
    import shutil

    shutil.copytree(tiny_checkpoints["llama"], tmp_path / "org" / "name")
    monkeypatch.chdir(tmp_path)
    assert resolve("org/name") == Path("org/name")
    assert edgellm.load("org/name").loaded.path == Path("org/name")
