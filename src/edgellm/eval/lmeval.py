"""edgellm as an lm-evaluation-harness model: `lm_eval.simple_evaluate(model="edgellm", ...)` after
`import edgellm.eval.lmeval` (lm-eval cannot discover outside models by itself), or `edgellm lm-eval`.

- `loglikelihood` runs on the evaluation engine of `edgellm mmlu` / `edgellm reasoning` (engine.py): requests
  are batched, requests with the same input share one forward row (lm-eval's one-token-continuation cache,
  generalised), and requests sharing a long token prefix (a question's choices, a few-shot prefix) compute
  that prefix's KV cache once.
- `loglikelihood_rolling` scores lm-eval's own disjoint rolling windows the same way.
- `generate_until` decodes one prompt at a time with edgellm's generator (greedy unless `do_sample`), stopping
  at EOS, at `max_gen_toks` or at a stop string, and cuts the text at the first stop string as lm-eval's
  `hf` model does.

Tokenization follows lm-eval's `hf` model (`TemplateLM._encode_pair`, BOS only where the tokenizer adds it,
left truncation to `max_length`), so on the same weights both give the same requests and, in fp32, the same
numbers (tests/eval/test_lmeval.py). The offline tasks live in `edgellm/eval/lmeval_tasks/`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lm_eval.models  # noqa: F401  (lm-eval's own models register lazily; keep them visible next to ours)
import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from ..errors import InvalidArgumentError
from ..generate import SamplingParams
from .cache import ResultStore, item_key
from .data import find_data_dir
from .engine import DEFAULT_BATCH_TOKENS, MIN_SHARED_PREFIX, Request, Runner, common_prefix_len

TASKS_DIR = Path(__file__).resolve().parent / "lmeval_tasks"
# Tokens of compute a shared prefix must save to pay for its group's own forward calls (the prefix fill and
# batches that cannot take other rows). Measured on 2 shared cores, 50 arc_easy items: one group per question
# (saving ~60 tokens each) took 130 s, everything in full unshared batches 25 s; so only long prefixes shared by
# many rows (few-shot blocks: MMLU, TruthfulQA's 6-shot prompt) are worth it.
SHARE_COST = 4096
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's default for `hf`
GEN_ROWS = 8  # generate_until: requests decoded together (continuous batching, serve/engine.py)

LLRequest = tuple[Any, list[int], list[int]]  # ((context, continuation) or None, context ids, continuation ids)


def group_requests(requests: Sequence[Request]) -> list[list[Request]]:
    """Split requests into groups for the engine: runs (in token order) whose shared prefix is worth computing
    once (its KV cache is copied to every row), and one last group of the rest, run unshared in full batches.

    Sorted requests form a tree by shared prefix (a task's fixed few-shot prefix, then each question, then its
    choices); each subtree is kept whole when sharing its prefix saves more, (rows - 1) x prefix - SHARE_COST
    tokens, than its best split into smaller subtrees."""
    order = sorted(requests, key=lambda r: r.ids)
    # link[i]: the prefix order[i] and order[i+1] can share (a wanted position is never inside it)
    link = [min(common_prefix_len([a.ids, b.ids]), min(a.positions), min(b.positions))
            for a, b in zip(order, order[1:], strict=False)]

    def best(lo: int, hi: int, depth: int = 0) -> tuple[int, list[tuple[int, int]]]:
        if hi - lo < 2:
            return 0, []
        s = min(link[lo:hi - 1])
        own = (hi - lo - 1) * s - SHARE_COST if s >= MIN_SHARED_PREFIX else 0
        if depth > 200:  # deeply nested prefixes: stop refining
            return (own, [(lo, hi)]) if own > 0 else (0, [])
        total, parts, start = 0, [], lo
        for i in [*(i for i in range(lo, hi - 1) if link[i] == s), hi - 1]:
            value, sub = best(start, i + 1, depth + 1)
            total, parts, start = total + value, parts + sub, i + 1
        if own > 0 and own >= total:
            return own, [(lo, hi)]
        return total, parts

    _, spans = best(0, len(order))
    groups = [order[lo:hi] for lo, hi in spans]
    taken = {i for lo, hi in spans for i in range(lo, hi)}
    loose = [r for i, r in enumerate(order) if i not in taken]
    return groups + [loose] if loose else groups


@register_model("edgellm")
class EdgeLLM(TemplateLM):
    """lm-eval model backed by an `edgellm.load()`ed model.

    Model args (`--model-args` / `model_args`): pretrained (GGUF file, HF folder or hub id; default: the bundled
    SmolLM2-135M-Instruct), dtype (auto | fp32 | bf16 | fp16), quant (re-quantize, e.g. rtn:w4:g32),
    rope_type, compile (generation's decode step: None = in C where nothing needs compiling, True = also
    torch.compile, False = eager), batch_tokens, threads, max_length, max_gen_toks,
    add_bos_token, prefix_token_id, progress. `llm=` takes an already loaded `edgellm.LLM` instead."""

    def __init__(self, pretrained: str | None = None, dtype: str = "auto", quant: str | None = None,
                 rope_type: str | None = None, compile: bool | None = None,
                 batch_tokens: int = DEFAULT_BATCH_TOKENS,
                 threads: int | None = None, max_length: int | None = None,
                 max_gen_toks: int = DEFAULT_MAX_GEN_TOKS, add_bos_token: bool | None = None,
                 prefix_token_id: int | None = None, progress: bool = True, llm: Any = None,
                 batch_size: Any = None, max_batch_size: Any = None, device: str | None = None,
                 adapter: str | None = None, speculative: str | None = "lookup", **unknown: Any) -> None:
        super().__init__()
        if unknown:
            raise InvalidArgumentError(f"unknown edgellm model arg(s): {', '.join(sorted(unknown))}")
        if device not in (None, "cpu"):
            raise InvalidArgumentError(f"edgellm runs on the CPU (device={device!r} given)")
        if batch_tokens < 1 or max_gen_toks < 1:
            raise InvalidArgumentError("batch_tokens and max_gen_toks must be >= 1")
        if threads is not None:
            if threads < 1:
                raise InvalidArgumentError("threads must be >= 1")
            torch.set_num_threads(threads)
        if llm is None:
            from ..api import load

            llm = load(pretrained, dtype=dtype, rope_type=rope_type, compile=compile,
                       keep_quantized=False if quant else None, adapter=adapter)
            if quant:
                from ..quant import quantize_llm

                quantize_llm(llm, quant)
        self.llm = llm
        self.tokenizer = llm.tokenizer
        self._max_length = max_length or llm.config.max_seq_len
        self._max_gen_toks = max_gen_toks
        self.batch_tokens = batch_tokens
        self.add_bos_token = add_bos_token
        self.custom_prefix_token_id = prefix_token_id
        self.progress = progress
        self.forward_s = 0.0
        # batched generate_until drafts by prompt lookup (same answers, fewer steps; see serve/engine.py)
        self.speculative = None if speculative in (None, "", "none", "off") else speculative
        if self.speculative not in (None, "lookup"):
            raise InvalidArgumentError(f"speculative={speculative!r}: generate_until speculates with 'lookup' or "
                                       f"'none'")

    # ------------------------------------------------------------------ what lm-eval asks of a model
    @property
    def eot_token_id(self) -> int:
        if not self.tokenizer.eos_ids:
            raise InvalidArgumentError("the tokenizer has no EOS token")
        return self.tokenizer.eos_ids[0]

    @property
    def prefix_token_id(self) -> int:
        if self.custom_prefix_token_id is not None:
            return self.custom_prefix_token_id
        return self.tokenizer.bos_id if self.tokenizer.bos_id is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        return str(self.llm.loaded.path).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs: Any) -> list[int]:
        add_bos = add_special_tokens if add_special_tokens is not None else self.add_bos_token
        if add_special_tokens is None and self.tokenizer.bos_token and string.startswith(self.tokenizer.bos_token):
            add_bos = False
        ids = self.tokenizer.encode(string, add_bos=add_bos)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def get_model_info(self) -> dict[str, Any]:
        return {"model_path": str(self.llm.loaded.path), "model_dtype": str(self.llm.dtype),
                "model_num_parameters": sum(p.numel() for p in self.llm.model.parameters())}

    # ------------------------------------------------------------------ scoring
    def _loglikelihood_tokens(self, requests: list[LLRequest], disable_tqdm: bool = False,
                              **kwargs: Any) -> list[tuple[float, bool]]:
        """(sum of log p(continuation), is the continuation the greedy one) per request, from the engine."""
        by_key: dict[str, Request] = {}
        keys = []
        for _, ctx, cont in requests:
            if not ctx or not cont:
                raise InvalidArgumentError("loglikelihood requests need a context and a continuation token")
            inp = (ctx + cont)[-(self.max_length + 1):][:-1]
            n = len(cont)
            key = item_key(inp, n)
            keys.append(key)
            req = by_key.get(key)
            if req is None:
                req = by_key[key] = Request(key, inp, list(range(len(inp) - n, len(inp))), meta=[])
            if cont not in req.meta:
                req.meta.append(cont)
        runner = Runner(self.llm, ResultStore(None, "lmeval"), progress=self.progress and not disable_tqdm,
                        desc="edgellm loglikelihood")
        plan = runner.plan(group_requests(list(by_key.values())), self.batch_tokens)

        def finish(req: Request, logits: torch.Tensor) -> dict[str, list[Any]]:
            logp = F.log_softmax(logits, dim=-1)
            greedy = logits.argmax(-1)
            out = []
            for cont in req.meta:
                t = torch.tensor(cont)
                out.append([float(logp.gather(-1, t[:, None]).sum()), bool((greedy == t).all())])
            return {"scores": out}

        values = runner.run(plan, finish)
        self.forward_s += runner.forward_s
        results = []
        for key, (_, _, cont) in zip(keys, requests, strict=True):
            ll, greedy = values[key]["scores"][by_key[key].meta.index(cont)]
            results.append((ll, greedy))
        for (pair, _, _), res in zip(requests, results, strict=True):
            if pair is not None:
                self.cache_hook.add_partial("loglikelihood", pair, res)
        return results

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Sum of log p over each string's tokens, on lm-eval's disjoint windows of `max_length` tokens."""
        windows: list[LLRequest] = []
        owner: list[int] = []
        for i, (string,) in enumerate(req.args for req in requests):
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, ctx, cont))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (ll, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm), strict=True):
            totals[i] += ll
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ------------------------------------------------------------------ generation
    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Each request's continuation until a stop string or max_gen_toks; GEN_ROWS requests decode together
        through the serving engine's continuous batching (each row's tokens are its own: a batched answer equals
        the request alone, as served), a single request through `llm.generate`."""
        eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        prompts, stops = [], []
        for context, gen_kwargs in [r.args for r in requests]:
            kwargs = dict(normalize_gen_kwargs(gen_kwargs, self.max_gen_toks))
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_new = int(kwargs.pop("max_gen_toks"))
            if max_new >= self.max_length:
                raise InvalidArgumentError(f"max_gen_toks {max_new} leaves no room in the context of "
                                           f"{self.max_length} tokens")
            ids = self.tok_encode(context, left_truncate_len=self.max_length - max_new)
            sampling: dict[str, Any] = {"max_new_tokens": max_new, "stop": [s for s in until if s]}
            if kwargs.pop("do_sample", False):
                sampling.update(temperature=float(kwargs.pop("temperature", 1.0)) or 1.0,
                                top_p=float(kwargs.pop("top_p", 1.0)), top_k=int(kwargs.pop("top_k", 0) or 0),
                                seed=kwargs.pop("seed", None))
            prompts.append((ids, SamplingParams.from_kwargs(**sampling)))
            stops.append(until)
        progress = self.progress and not disable_tqdm
        if len(prompts) == 1:
            texts = [self.llm.generate(ids, **vars(p)) for ids, p in tqdm(
                prompts, desc="edgellm generate_until", disable=not progress, leave=False)]
        else:
            texts = self._generate_batched(prompts, progress)
        out = []
        for req, text, until in zip(requests, texts, stops, strict=True):
            text = postprocess_generated_text(text, until, None)
            out.append(text)
            self.cache_hook.add_partial("generate_until", req.args, text)
        return out

    def _generate_batched(self, prompts: list[tuple[list[int], SamplingParams]], progress: bool) -> list[str]:
        from ..serve.engine import Engine
        from ..serve.engine import Request as GenRequest

        model = self.llm.model
        saved = [layer.self_attn.cache for layer in model.layers]  # llm.generate's caches, put back after
        ctx = max(len(ids) + p.max_new_tokens for ids, p in prompts) + 1
        engine = Engine(model, self.llm.tokenizer, parallel=min(GEN_ROWS, len(prompts)), ctx=ctx,
                        max_queue=len(prompts), speculative=self.speculative)
        pieces: list[list[str]] = [[] for _ in prompts]
        errors: list[str] = []
        bar = tqdm(total=len(prompts), desc="edgellm generate_until", disable=not progress, leave=False)

        def emitter(i: int) -> Any:
            def emit(kind: str, payload: Any) -> None:
                if kind == "tokens":
                    pieces[i].extend(t.text for t in payload)
                    return
                if kind == "error":
                    errors.append(payload)
                bar.update(1)
            return emit

        for i, (ids, params) in enumerate(prompts):
            engine.submit(GenRequest(ids, params, emitter(i)))
        try:
            engine.run_until_done()
        finally:
            bar.close()
            model.use_caches(saved)
        if errors:
            raise RuntimeError(f"generate_until: {errors[0]}")
        return ["".join(p) for p in pieces]


# ---------------------------------------------------------------------------------------------- tasks
def task_manager(data_dir: str | Path | None = None, include_defaults: bool = False) -> Any:
    """An lm-eval TaskManager that knows edgellm's offline tasks (data read from `data_dir`, by default
    `$EDGELLM_DATA_DIR` or a `shared/data` folder found as in `edgellm reasoning`). `include_defaults` adds
    lm-eval's own task library (which loads its data from the Hugging Face hub)."""
    from lm_eval.tasks import TaskManager

    meta: dict[str, Any] = {}
    if data_dir is not None:
        root = find_data_dir(data_dir)
        meta["data_dir"] = str(root)
    return TaskManager(include_path=str(TASKS_DIR), include_defaults=include_defaults, metadata=meta or None)


def offline_env() -> None:
    """Tell the Hugging Face libraries not to reach the hub (our tasks read local files only)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
