"""Bad input gives a typed exception from the API and, from the CLI, one line on stderr naming the problem
with exit code 2 (no traceback)."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

import edgellm
from edgellm import errors
from edgellm.cli import main

Breaker = Callable[[Path], None]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: 1 thread, restored after the module


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test here may touch the network: hub ids resolve from the (empty) cache only."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc: int, err: str, verb: str, *words: str) -> str:
    assert rc == 2, err
    assert "Traceback" not in err
    lines = err.strip("\n").split("\n")
    assert len(lines) == 1, err
    assert lines[0].startswith(f"edgellm {verb}: error: "), err
    for w in words:
        assert w.lower() in lines[0].lower(), (w, err)
    return lines[0]


# ---------------------------------------------------------------------------------------------- broken files
def _edit_config(**changes: object) -> Breaker:
    def edit(folder: Path) -> None:
        cfg = json.loads((folder / "config.json").read_text())
        for k, v in changes.items():
            if v is None:
                cfg.pop(k, None)
            else:
                cfg[k] = v
        (folder / "config.json").write_text(json.dumps(cfg))
    return edit


def _truncate_safetensors(folder: Path) -> None:
    f = folder / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])


def _corrupt_safetensors_header(folder: Path) -> None:
    f = folder / "model.safetensors"
    data = f.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    f.write_bytes(data[:8] + b"{" * n + data[8 + n:])  # same size, header no longer JSON


# name -> (break the tiny folder, expected error, words the message must contain)
HF_CASES: dict[str, tuple[Breaker, type[errors.EdgeLLMError], tuple[str, ...]]] = {
    "truncated-safetensors": (_truncate_safetensors, errors.CorruptCheckpointError, ("model.safetensors",)),
    "corrupt-safetensors": (_corrupt_safetensors_header, errors.CorruptCheckpointError,
                            ("model.safetensors", "header")),
    "unsupported-arch": (_edit_config(model_type="gpt_neox", architectures=["GPTNeoXForCausalLM"]),
                         errors.UnsupportedModelError, ("unsupported", "gpt_neox")),
    "unsupported-rope": (_edit_config(rope_scaling={"rope_type": "yarn", "factor": 4.0}),
                         errors.UnsupportedModelError, ("yarn",)),
    "config-missing-field": (_edit_config(hidden_size=None), errors.CorruptCheckpointError,
                             ("config.json", "hidden_size")),
    "config-bad-json": (lambda f: (f / "config.json").write_text("{oops"), errors.CorruptCheckpointError,
                        ("config.json", "json")),
    "config-shape-mismatch": (_edit_config(intermediate_size=100), errors.CorruptCheckpointError,
                              ("shape", "mlp")),
    "missing-tokenizer": (lambda f: (f / "tokenizer.json").unlink(), errors.TokenizerError, ("tokenizer.json",)),
    "broken-tokenizer": (lambda f: (f / "tokenizer.json").write_text("{}"), errors.TokenizerError,
                         ("tokenizer.json",)),
    "no-weights": (lambda f: (f / "model.safetensors").unlink(), errors.ModelNotFoundError, ("safetensors",)),
}


@pytest.fixture
def broken(request: pytest.FixtureRequest, tiny_checkpoints: dict[str, Path], tmp_path: Path):
    breaker, exc, words = HF_CASES[request.param]
    folder = shutil.copytree(tiny_checkpoints["llama"], tmp_path / "model")
    breaker(folder)
    return folder, exc, words


@pytest.mark.parametrize("broken", list(HF_CASES), indirect=True)
def test_broken_hf_folder_api(broken: tuple) -> None:
    folder, exc, words = broken
    with pytest.raises(exc) as info:
        edgellm.load(folder)
    message = str(info.value)
    assert "\n" not in message
    for w in words:
        assert w.lower() in message.lower()


@pytest.mark.parametrize("broken", list(HF_CASES), indirect=True)
def test_broken_hf_folder_cli(broken: tuple, capsys: pytest.CaptureFixture[str]) -> None:
    folder, _, words = broken
    rc, out, err = cli(capsys, "generate", "--model", str(folder), "-n", "2", "hello")
    assert_one_line_error(rc, err, "generate", *words)
    assert out == ""


def _gguf_variants(src: Path, folder: Path) -> dict[str, tuple[Path, tuple[str, ...]]]:
    data = src.read_bytes()
    variants = {
        "header-truncated": (data[:2000], ("truncated",)),
        "data-truncated": (data[: len(data) * 2 // 3], ("truncated",)),
        "last-bytes-missing": (data[:-64], ("truncated",)),
        "not-gguf": (b"PK\x03\x04 this is a zip file, not a model" * 4, ("gguf",)),
        "empty": (b"", ("gguf",)),
    }
    out = {}
    for name, (blob, words) in variants.items():
        path = folder / f"{name}.gguf"
        path.write_bytes(blob)
        out[name] = (path, words)
    return out


@pytest.fixture(scope="module")
def bad_ggufs(default_gguf: Path, tmp_path_factory: pytest.TempPathFactory):
    return _gguf_variants(default_gguf, tmp_path_factory.mktemp("gguf"))


@pytest.mark.parametrize("name", ["header-truncated", "data-truncated", "last-bytes-missing", "not-gguf", "empty"])
def test_truncated_or_corrupt_gguf(bad_ggufs: dict, name: str, capsys: pytest.CaptureFixture[str]) -> None:
    path, words = bad_ggufs[name]
    with pytest.raises(errors.CorruptCheckpointError) as info:
        edgellm.load(path)
    assert "\n" not in str(info.value)
    assert str(path) in str(info.value) or path.name in str(info.value)
    rc, out, err = cli(capsys, "generate", "--model", str(path), "hello")
    assert_one_line_error(rc, err, "generate", path.name, *words)
    rc, out, err = cli(capsys, "info", "--model", str(path))
    assert_one_line_error(rc, err, "info", path.name)


# ---------------------------------------------------------------------------------------------- unknown models
@pytest.mark.parametrize("model", ["/nonexistent/dir/model.gguf", "./no/such/folder", "no-such-org/no-such-model",
                                   "no-such-org/repo:file.gguf"])
def test_unknown_model(model: str, capsys: pytest.CaptureFixture[str], tmp_path: Path,
                       monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(errors.ModelNotFoundError) as info:
        edgellm.load(model)
    assert model in str(info.value) and "\n" not in str(info.value)
    rc, out, err = cli(capsys, "generate", "--model", model, "hello")
    assert_one_line_error(rc, err, "generate", model, "not found")
    for verb in (["chat"], ["demo"], ["info"], ["info", "--load"]):
        rc, out, err = cli(capsys, *verb, "--model", model)
        assert_one_line_error(rc, err, verb[0], model)


def test_a_file_that_is_not_a_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "notes.txt"
    f.write_text("hello")
    with pytest.raises(errors.ModelNotFoundError, match="notes.txt"):
        edgellm.load(f)
    rc, _, err = cli(capsys, "generate", "--model", str(f), "hi")
    assert_one_line_error(rc, err, "generate", "notes.txt")
    rc, _, err = cli(capsys, "info", "--model", str(tmp_path))  # an empty folder
    assert_one_line_error(rc, err, "info", str(tmp_path))


def test_invalid_dtype(tiny_checkpoints: dict[str, Path]) -> None:
    with pytest.raises(errors.InvalidArgumentError, match="dtype"):
        edgellm.load(tiny_checkpoints["llama"], dtype="int3")


# ---------------------------------------------------------------------------------------------- prompts, sampling
@pytest.fixture(scope="module")
def tiny(tiny_checkpoints: dict[str, Path]) -> edgellm.LLM:
    return edgellm.load(tiny_checkpoints["llama"], dtype="fp32")


def test_prompt_longer_than_context(tiny: edgellm.LLM, tiny_checkpoints: dict[str, Path],
                                    capsys: pytest.CaptureFixture[str]) -> None:
    long = "the " * 300  # > 256 tokens of context
    assert len(tiny.tokenizer.encode(long)) > tiny.config.max_seq_len
    for call in (lambda: tiny.generate(long), lambda: tiny.stream(long),
                 lambda: tiny.chat([{"role": "user", "content": long}]), lambda: tiny.logits(
                     tiny.tokenizer.encode(long))):
        with pytest.raises(errors.ContextLengthError, match="context"):
            call()
    # fits alone, but not with the requested new tokens
    with pytest.raises(errors.ContextLengthError, match="max_new_tokens"):
        tiny.generate("the " * 200, max_new_tokens=100)
    model = str(tiny_checkpoints["llama"])
    rc, out, err = cli(capsys, "generate", "--model", model, long)
    line = assert_one_line_error(rc, err, "generate", "context", "256")
    assert str(len(tiny.tokenizer.encode(long))) in line
    rc, out, err = cli(capsys, "generate", "--model", model, "-n", "100", "the " * 200)
    assert_one_line_error(rc, err, "generate", "max_new_tokens")


def test_empty_prompt(tiny: edgellm.LLM, tiny_checkpoints: dict[str, Path], capsys: pytest.CaptureFixture[str],
                      monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(errors.InvalidArgumentError, match="empty"):
        tiny.generate("")
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    rc, _, err = cli(capsys, "generate", "--model", str(tiny_checkpoints["llama"]))
    assert_one_line_error(rc, err, "generate", "empty")


CLI_BAD_SAMPLING = [
    (["--temperature", "-1"], "temperature"), (["--top-p", "0"], "top_p"), (["--top-p", "1.5"], "top_p"),
    (["--top-k", "-3"], "top_k"), (["--min-p", "1"], "min_p"), (["--repetition-penalty", "0"], "repetition_penalty"),
    (["--max-new-tokens", "0"], "max_new_tokens"), (["--temperature", "nan"], "temperature"),
    (["--stop", ""], "stop"),
]


@pytest.mark.parametrize(("flags", "word"), CLI_BAD_SAMPLING, ids=lambda v: " ".join(v) if isinstance(v, list) else v)
def test_invalid_sampling_values(flags: list[str], word: str, tiny: edgellm.LLM, tiny_checkpoints: dict[str, Path],
                                 capsys: pytest.CaptureFixture[str]) -> None:
    kwargs = {word: None}
    value = flags[1]
    kwargs[word] = [value] if word == "stop" else (int(value) if word in ("top_k", "max_new_tokens")
                                                   else float(value))
    with pytest.raises(errors.InvalidArgumentError, match=word):
        tiny.generate("hello", **kwargs)
    model = str(tiny_checkpoints["llama"])
    rc, out, err = cli(capsys, "generate", "--model", model, *flags, "hello")
    assert_one_line_error(rc, err, "generate", "invalid sampling value", word)
    assert out == ""
    # the chat REPL rejects them up front too (exit 2), instead of printing an error per turn
    rc, out, err = cli(capsys, "chat", "--model", model, *flags)
    assert_one_line_error(rc, err, "chat", word)


def test_chat_without_template(tiny_checkpoints: dict[str, Path], tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    folder = shutil.copytree(tiny_checkpoints["llama"], tmp_path / "m")
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    with pytest.raises(errors.TokenizerError, match="chat template"):
        edgellm.load(folder).chat([{"role": "user", "content": "hi"}])
    rc, _, err = cli(capsys, "generate", "--chat", "--model", str(folder), "hi")
    assert_one_line_error(rc, err, "generate", "chat template")


def test_info_bad_inputs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = cli(capsys, "info", "--config", str(tmp_path / "missing.json"))
    assert_one_line_error(rc, err, "info", "missing.json")
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    rc, _, err = cli(capsys, "info", "--config", str(cfg))
    assert_one_line_error(rc, err, "info", "unsupported", "bert")
    cfg.write_text("[1, 2]")
    rc, _, err = cli(capsys, "info", "--config", str(cfg))
    assert_one_line_error(rc, err, "info", "config.json")
    rc, _, err = cli(capsys, "info", "--context", "0")
    assert_one_line_error(rc, err, "info", "--context")


def test_every_error_is_an_edgellm_error() -> None:
    for cls in (errors.ModelNotFoundError, errors.CorruptCheckpointError, errors.UnsupportedModelError,
                errors.TokenizerError, errors.ContextLengthError, errors.InvalidArgumentError):
        assert issubclass(cls, errors.EdgeLLMError)
        assert getattr(edgellm, cls.__name__) is cls


# ---------------------------------------------------------------------------------------------- real processes
def _run(*argv: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "edgellm", *argv], input=stdin, capture_output=True, text=True,
                          env=env, timeout=120)


def test_subprocess_errors_are_one_line_with_exit_code_2(tiny_checkpoints: dict[str, Path], tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.gguf")
    proc = _run("generate", "--model", missing, "hello")
    assert_one_line_error(proc.returncode, proc.stderr, "generate", "not found", missing)
    assert proc.stdout == ""
    folder = shutil.copytree(tiny_checkpoints["llama"], tmp_path / "m")
    _truncate_safetensors(folder)
    proc = _run("generate", "--model", str(folder), "--temperature", "0.5", "hello")
    assert_one_line_error(proc.returncode, proc.stderr, "generate", "model.safetensors")


@pytest.mark.parametrize("exc", [errors.CorruptCheckpointError("bad file\n  detail on a second line\n"),
                                 PermissionError(13, "Permission denied", "/models/x.gguf")],
                         ids=["multiline", "oserror"])
def test_cli_prints_any_bad_input_error_on_one_line(exc: Exception, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    import edgellm.cli

    def fail(args: object) -> None:
        raise exc

    monkeypatch.setattr(edgellm.cli, "load_from_args", fail)
    rc, out, err = cli(capsys, "generate", "hello")
    line = assert_one_line_error(rc, err, "generate")
    assert ("bad file detail on a second line" in line) or ("Permission denied" in line and "/models/x.gguf" in line)
