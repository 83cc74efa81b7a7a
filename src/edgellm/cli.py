"""`edgellm VERB ...` — one verb per job. Errors on bad input print one line and exit with code 2."""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import EdgeLLMError, InvalidArgumentError, ModelNotFoundError
from .generate import SamplingParams

if TYPE_CHECKING:
    from .api import LLM

DEMO_PROMPTS = ["What is the meaning of life?", "Tell me something you don't know.", "What does Xilinx do?"]
TIMING_HEADERS = ["Example#", "Prompt Length (tokens)", "New Tokens Generated", "Total Time (s)",
                  "Prefill Phase (ms)", "Time/Token (ms)", "Tokens/Sec"]

# Feature modules that add their own verbs: each exposes register(subparsers) -> None.
FEATURE_MODULES: list[str] = ["edgellm.eval.cli", "edgellm.quant.cli", "edgellm.bench", "edgellm.embed",
                               "edgellm.serve.cli", "edgellm.finetune.cli", "edgellm.eval.lmeval_cli"]


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=None,
                   help="GGUF file, HF folder or hub id (default: bundled SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32", "fp16"],
                   help="compute dtype; auto (default): bf16 on CPUs with native bf16, else fp32, and a GGUF's "
                        "Q4_0/Q4_1/Q8_0 weights stay quantized (an explicit dtype dequantizes them)")
    p.add_argument("--rope-type", "--rope_type", dest="rope_type", default=None,
                   choices=["simple", "llama3.1", "llama3.2"], help="override the checkpoint's RoPE scaling")
    p.add_argument("--adapter", default=None,
                   help="a LoRA adapter folder in PEFT's format (edgellm finetune's --out, or PEFT's)")


def add_compile_args(p: argparse.ArgumentParser) -> None:
    # The compiled decode step is the default fast path; EDGELLM_COMPILE=0 flips the default (tests use it).
    default = os.environ.get("EDGELLM_COMPILE", "1") != "0"
    p.add_argument("--compile", dest="compile", action="store_true", default=default,
                   help="decode with the torch.compile'd step (default; cached on disk after the first run)")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="eager PyTorch decode")


def add_sampling_args(p: argparse.ArgumentParser, max_new_tokens: int = 128) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", "-n", type=int, default=max_new_tokens)
    g.add_argument("--temperature", "-t", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def add_speculative_args(p: argparse.ArgumentParser, sweep: bool = False) -> None:
    from .speculative import K_MAX, METHODS

    g = p.add_argument_group("speculative decoding (same output, faster; see edgellm/speculative.py)")
    many = {"nargs": "+"} if sweep else {}
    g.add_argument("--speculative", choices=METHODS, default=None, **many,
                   help="lookup: n-grams of the prompt; self: this checkpoint's 4-bit weights draft for the "
                        "higher-precision model (--dtype auto then means fp32); draft: --draft-model"
                        + (" (several: one sweep each; default lookup self)" if sweep else ""))
    g.add_argument("--draft-model", default=None, help="draft checkpoint with the same tokenizer")
    g.add_argument("--draft-k", type=int, default=None, **many,
                   help=f"tokens per draft, 1..{K_MAX}; default adaptive"
                        + (" (sweep default: 1 3 7 16, the compiled verify sizes)" if sweep else ""))


def sampling_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                seed=args.seed, stop=tuple(args.stop))


def load_from_args(args: argparse.Namespace) -> LLM:
    from .api import load

    return load(args.model, dtype=args.dtype, rope_type=args.rope_type, compile=getattr(args, "compile", False),
                speculative=getattr(args, "speculative", None), draft_model=getattr(args, "draft_model", None),
                draft_k=getattr(args, "draft_k", None), adapter=getattr(args, "adapter", None))


# ---------------------------------------------------------------------------------------------- verbs
def cmd_generate(args: argparse.Namespace) -> int:
    if args.prompt not in (None, "-"):
        prompt = args.prompt
    else:  # piped text; the newline `echo` adds is not part of the prompt
        prompt = sys.stdin.read().removesuffix("\n").removesuffix("\r")
    SamplingParams.from_kwargs(**sampling_kwargs(args))  # bad values fail before the model loads
    llm = load_from_args(args)
    kwargs = sampling_kwargs(args)
    pieces = llm.stream_chat([{"role": "user", "content": prompt}], **kwargs) if args.chat \
        else llm.stream(prompt, **kwargs)
    text = []
    for piece in pieces:
        text.append(piece)
        if not args.json:
            print(piece, end="", flush=True)
    s = llm.last_stats
    if args.json:
        print(json.dumps({"text": "".join(text), **s.to_dict()}, ensure_ascii=False))
    else:
        print()
        if s.speculative:
            print(f"[speculative {s.speculative}: {s.accepted}/{s.drafted} drafted tokens accepted "
                  f"({s.acceptance_rate:.0%}), {s.mean_accepted:.2f} per round, {s.tokens_per_s:.1f} tokens/s]",
                  file=sys.stderr)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    SamplingParams.from_kwargs(**sampling_kwargs(args))  # bad values end the command (exit 2), not each turn
    llm = load_from_args(args)
    base = [{"role": "system", "content": args.system}] if args.system else []
    history = list(base)
    interactive = sys.stdin.isatty()
    print(f"edgellm chat with {llm.loaded.source} — /reset clears the conversation, /exit quits.")
    while True:
        try:
            line = input("> " if interactive else "")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            history = list(base)
            print("(conversation cleared)")
            continue
        history.append({"role": "user", "content": line})
        reply = []
        try:
            for piece in llm.stream_chat(history, **sampling_kwargs(args)):
                reply.append(piece)
                print(piece, end="", flush=True)
        except KeyboardInterrupt:
            print(" [interrupted]", end="")
        except EdgeLLMError as e:  # e.g. the conversation outgrew the context: keep the REPL alive
            history.pop()
            print(f"error: {e} (try /reset)")
            continue
        print()
        history.append({"role": "assistant", "content": "".join(reply)})


def cmd_info(args: argparse.Namespace) -> int:
    from .info import info_report
    from .kernels import cpu
    from .loading import resolve
    from .loading.gguf_file import GGUFCheckpoint
    from .loading.hf_folder import config_from_hf_file
    from .report import markdown_table

    if args.context < 1:
        raise InvalidArgumentError(f"--context must be >= 1 (got {args.context})")
    model = None
    if args.config:
        path = Path(args.config)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ModelNotFoundError(f"config file not found: {args.config}")
        config = config_from_hf_file(path)
    elif args.load:
        llm = load_from_args(args)
        config, model = llm.config, llm.model
    else:  # read only the config: works for any size without loading weights
        path = resolve(args.model)
        if path.is_file() and path.suffix == ".json":
            config = config_from_hf_file(path)
        elif path.is_dir() and (path / "config.json").is_file():
            from .quant.checkpoint import describe_model

            config = config_from_hf_file(path / "config.json")
            model = describe_model(path)  # QLinearPerGrp layers for quantized folders, else None
        elif path.is_file() or (path.is_dir() and len(list(path.glob("*.gguf"))) == 1):
            config = GGUFCheckpoint(path if path.is_file() else next(path.glob("*.gguf"))).config
        else:
            raise ModelNotFoundError(f"{path}: neither a GGUF file, an HF model folder nor a config.json")
    if args.rope_type:
        config.with_rope_type(args.rope_type)
    print(info_report(config, args.context, model))
    if args.train:
        from .info import training_report

        print("\n" + training_report(config, args.train, args.seqlen, args.batch, args.lora_r))
    print(f"\nCPU: {cpu.summary()}\n")
    print(markdown_table(["operation", "path on this CPU"], [[k, v] for k, v in cpu.paths().items()]))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .kernels import cpu
    from .report import markdown_table

    t0 = time.perf_counter()
    llm = load_from_args(args)
    if llm.generator.compiled is not None:  # compile (or load the cached kernels) before timing anything
        llm.generate("Hi there, how are you?", max_new_tokens=2, ignore_eos=True)  # a prefill too
        g = llm.generator
        if g.compiled.native is not None:
            print(f"Decode step: one C call per token, nothing to compile (loaded, C kernels ready, in "
                  f"{time.perf_counter() - t0:.1f} s)")
        else:
            print(g.note or f"Compiled decode step ready in {g.compile_s:.1f} s (cached on disk for later runs)")
    print(f"Model: {llm.loaded.path} ({llm.config.arch}, {llm.dtype}, {args.max_new_tokens} new tokens, greedy)")
    print(f"CPU: {cpu.summary()}\n")
    rows = []
    for i, prompt in enumerate(DEMO_PROMPTS, 1):
        answer = llm.chat([{"role": "user", "content": prompt}], max_new_tokens=args.max_new_tokens)
        s = llm.last_stats
        print(f"Prompt: {prompt}\nResponse: {answer.strip()}\n")
        rows.append([i, s.prompt_tokens, s.new_tokens, round(s.total_s, 5), round(s.prefill_ms, 3),
                     round(s.time_per_token_ms, 3), round(s.tokens_per_s, 5)])
    print(markdown_table(TIMING_HEADERS, rows))
    return 0


# ---------------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgellm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="VERB")

    p = sub.add_parser("generate", help="complete a prompt (argument or stdin)")
    p.add_argument("prompt", nargs="?", default=None, help="prompt text; '-' or omitted reads stdin")
    add_model_args(p)
    add_compile_args(p)
    add_sampling_args(p)
    add_speculative_args(p)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--json", action="store_true", help="print one JSON object with text and timings")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive multi-turn chat (/reset, /exit)")
    add_model_args(p)
    add_compile_args(p)
    add_sampling_args(p, max_new_tokens=512)
    add_speculative_args(p)
    p.add_argument("--system", default=None, help="system prompt")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("info", help="module tree, parameter counts and memory table")
    add_model_args(p)
    p.add_argument("--config", default=None, help="an HF config.json to describe (no weights needed)")
    p.add_argument("--context", type=int, default=8192, help="context length for the KV-cache column")
    p.add_argument("--load", action="store_true", help="load the weights and print the live module tree")
    p.add_argument("--train", nargs="+", default=None, choices=["full", "lora", "qlora"],
                   help="add the training-memory table (weights, gradients, AdamW states, activations)")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per training sequence (--train)")
    p.add_argument("--batch", type=int, default=4, help="sequences per micro-batch (--train)")
    p.add_argument("--lora-r", type=int, default=16, help="LoRA rank on q,k,v,o (--train)")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("demo", help="the main job: answer three prompts and print the timing table")
    add_model_args(p)
    add_compile_args(p)
    add_speculative_args(p)
    p.add_argument("--max-new-tokens", "-n", type=int, default=60)
    p.set_defaults(func=cmd_demo)

    for name in FEATURE_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def one_line(e: BaseException) -> str:
    """An exception as one line (library messages sometimes span several)."""
    return " ".join(str(e).split()) or type(e).__name__


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except EdgeLLMError as e:
        print(f"edgellm {args.command}: error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except OSError as e:  # unreadable / missing / directory-instead-of-file paths given by the user
        print(f"edgellm {args.command}: error: {one_line(e)}", file=sys.stderr)
        return 2
    finally:
        if argv is None:  # the program itself (not a caller passing arguments): the process ends next
            # At exit the interpreter would run the cyclic GC over the millions of objects torch's compiler
            # stack creates (~1 s after the last token of `edgellm generate`). Every file edgellm writes is
            # closed explicitly, so those objects are frozen (left to the OS) instead: exit takes ~0.2 s.
            gc.freeze()


if __name__ == "__main__":
    raise SystemExit(main())
