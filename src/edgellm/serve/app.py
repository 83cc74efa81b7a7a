"""The OpenAI-compatible HTTP API (FastAPI) in front of the continuous-batching engine.

Every error is OpenAI-shaped (`{"error": {"message", "type", "param", "code"}}`) and a bad request is a 4xx,
never a 5xx. Requests only carry text and token ids: nothing in a request can name a file on the server.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import secrets
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import EdgeLLMError
from ..generate import SamplingParams
from .engine import Engine, TokenOut
from .engine import Request as EngineRequest
from .metrics import Metrics
from .schema import (
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    TokenizeRequest,
    error_body,
)


@dataclass
class ServerConfig:
    model: str | None = None
    dtype: str = "auto"
    parallel: int = 4
    ctx_size: int = 2048
    max_queue: int = 64
    api_key: str | None = None
    max_body_bytes: int = 4 << 20
    cors: tuple[str, ...] = ()
    model_id: str | None = None
    adapter: str | None = None  # a PEFT LoRA adapter folder
    threads: int | None = None  # compute threads (None: torch's count in the process that creates the app)
    speculative: str | None = None  # "lookup": prompt-lookup drafts verified in the batched step (engine.py)
    draft_k: int | None = None      # fixed draft length; None: adaptive per request


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error", headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type, self.headers = (
            status, message, param, code, type_, headers)


def model_id_of(source: Any) -> str:
    name = Path(str(source)).name
    return name[:-5] if name.endswith(".gguf") else name


class Server:
    """Loads the model in the background (GET /health is 503 until then) and owns the engine."""

    def __init__(self, cfg: ServerConfig) -> None:
        self.cfg = cfg
        self.metrics = Metrics()
        self.engine: Engine | None = None
        self.llm: Any = None
        self.grammars: Any = None
        self.load_error: str | None = None
        self.model_id = cfg.model_id or ""
        self.created = int(time.time())

    def load_and_run(self) -> None:
        """Load the model, then run the engine's loop, on this one thread (until the engine stops).

        Why one thread: OpenMP keeps a thread team per thread that runs parallel kernels. A second such thread
        (loading on one, decoding on another) leaves more OpenMP threads than cores, and libgomp then stops
        spinning between parallel regions: every kernel call pays a futex wake-up, and a decode step of the
        default model took 15 ms instead of 5 on 2 cores."""
        torch.set_num_threads(self.cfg.threads or torch.get_num_threads())  # a thread's own OpenMP setting
        try:
            from .. import api
            from .grammar import GrammarFactory

            llm = api.load(self.cfg.model, dtype=self.cfg.dtype, adapter=self.cfg.adapter)
            ctx = min(self.cfg.ctx_size, llm.config.max_seq_len)
            engine = Engine(llm.model, llm.tokenizer, self.cfg.parallel, ctx, self.cfg.max_queue, self.metrics,
                            speculative=self.cfg.speculative, draft_k=self.cfg.draft_k)
            self.grammars = GrammarFactory(llm.tokenizer, llm.config.vocab_size)
            self.model_id = self.cfg.model_id or model_id_of(llm.loaded.path)
            self.llm = llm
            self.engine = engine
        except Exception as e:  # reported by /health and every endpoint; the process keeps serving errors
            self.load_error = f"{type(e).__name__}: {e}" if not isinstance(e, EdgeLLMError) else str(e)
            return
        engine.run()

    # ------------------------------------------------------------------ request helpers
    def ready_engine(self) -> Engine:
        if self.engine is None:
            msg = f"model failed to load: {self.load_error}" if self.load_error else "model is loading"
            raise ApiError(503, msg, type_="server_error", code="unavailable", headers={"Retry-After": "1"})
        return self.engine

    def check_model(self, name: str | None) -> None:
        if name and name != self.model_id:
            raise ApiError(404, f"model '{name}' does not exist; this server serves '{self.model_id}'",
                           param="model", code="model_not_found")

    def sampling(self, body: Any, prompt_len: int, max_new: int | None) -> SamplingParams:
        ctx = self.ready_engine().ctx
        if max_new is None:
            max_new = ctx - prompt_len
        if prompt_len + max_new > ctx or max_new < 1:
            raise ApiError(400, f"the prompt is {prompt_len} tokens and max_tokens is {max_new}: together more than "
                                f"this server's context of {ctx} tokens", param="max_tokens",
                           code="context_length_exceeded")
        stop = body.stop if body.stop is not None else ()
        try:
            return SamplingParams(max_new_tokens=max_new, temperature=body.temperature, top_k=body.top_k,
                                  top_p=body.top_p, min_p=body.min_p, repetition_penalty=body.repetition_penalty,
                                  seed=body.seed, stop=stop).validate()
        except EdgeLLMError as e:
            raise ApiError(400, str(e)) from None

    def logit_bias(self, bias: dict[str, float] | None) -> dict[int, float]:
        out = {}
        vocab = self.llm.config.vocab_size
        for key, value in (bias or {}).items():
            if not key.isdigit() or int(key) >= vocab:
                raise ApiError(400, f"logit_bias keys must be token ids in [0, {vocab}) (got {key!r})",
                               param="logit_bias")
            out[int(key)] = float(value)
        return out

    def check_ids(self, ids: list[int], param: str) -> list[int]:
        vocab = self.llm.config.vocab_size
        if any(not 0 <= t < vocab for t in ids):
            raise ApiError(400, f"{param}: token ids must be in [0, {vocab})", param=param)
        return ids


async def read_json(request: Request, limit: int) -> Any:
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"request body is larger than {limit} bytes", code="request_too_large")
    try:
        return json.loads(body)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ApiError(400, "request body is not valid JSON (UTF-8)", code="invalid_json") from None


def validate(cls: type[BaseModel], data: Any) -> Any:
    if not isinstance(data, dict):
        raise ApiError(400, "request body must be a JSON object", code="invalid_json")
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        # pydantic adds union-branch names ("list[int]", "str") to the location: keep the field path only
        param = ".".join(str(x) for x in err["loc"] if not (isinstance(x, str) and ("[" in x or x == "str")))
        raise ApiError(400, f"invalid value for '{param or 'body'}': {err['msg']}", param=param or None) from None


def piece_bytes(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def create_app(cfg: ServerConfig) -> FastAPI:
    if cfg.threads is None:  # read here: torch.set_num_threads is per thread, the engine's thread starts fresh
        cfg = dataclasses.replace(cfg, threads=torch.get_num_threads())
    server = Server(cfg)

    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        threading.Thread(target=server.load_and_run, name="edgellm-engine", daemon=True).start()
        yield
        if server.engine is not None:
            server.engine.stop()

    app = FastAPI(title="edgellm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    if cfg.cors:
        app.add_middleware(CORSMiddleware, allow_origins=list(cfg.cors), allow_methods=["*"], allow_headers=["*"])

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        return JSONResponse(error_body(e.message, e.type, e.param, e.code), status_code=e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        message = f"no route {request.method} {request.url.path}" if e.status_code in (404, 405) else str(e.detail)
        return JSONResponse(error_body(message, code="not_found" if e.status_code == 404 else None),
                            status_code=e.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception) -> JSONResponse:
        return JSONResponse(error_body(f"internal error: {type(e).__name__}", "server_error"), status_code=500)

    @app.middleware("http")
    async def auth_and_size(request: Request, call_next: Any) -> Response:
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > cfg.max_body_bytes):
            return JSONResponse(error_body(f"request body is larger than {cfg.max_body_bytes} bytes",
                                           code="request_too_large"), status_code=413)
        if cfg.api_key and request.url.path != "/health" and request.method != "OPTIONS":
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {cfg.api_key}".encode()):
                return JSONResponse(error_body("missing or wrong API key (Authorization: Bearer ...)",
                                               code="invalid_api_key"), status_code=401)
        return await call_next(request)

    @app.get("/health")
    async def health() -> JSONResponse:
        if server.engine is None:
            status = "error" if server.load_error else "loading"
            return JSONResponse({"status": status, "error": server.load_error}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(server.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        server.ready_engine()
        return {"object": "list", "data": [{"id": server.model_id, "object": "model", "created": server.created,
                                            "owned_by": "edgellm"}]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> dict[str, Any]:
        server.ready_engine()
        server.check_model(name)
        return {"id": server.model_id, "object": "model", "created": server.created, "owned_by": "edgellm"}

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict[str, Any]:
        body = validate(TokenizeRequest, await read_json(request, cfg.max_body_bytes))
        server.ready_engine()
        return {"tokens": server.llm.tokenizer.encode(body.content, add_bos=body.add_special)}

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict[str, Any]:
        body = validate(DetokenizeRequest, await read_json(request, cfg.max_body_bytes))
        server.ready_engine()
        return {"content": server.llm.tokenizer.decode(server.check_ids(body.tokens, "tokens"))}

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> dict[str, Any]:
        from ..embed import embed_ids, to_base64

        body = validate(EmbeddingRequest, await read_json(request, cfg.max_body_bytes))
        engine = server.ready_engine()
        server.check_model(body.model)
        inputs = [body.input] if isinstance(body.input, str) or isinstance(body.input[0], int) else body.input
        tok = server.llm.tokenizer
        ids = [tok.encode(x) if isinstance(x, str) else server.check_ids(x, "input") for x in inputs]
        limit = server.llm.config.max_seq_len
        for i, x in enumerate(ids):
            if len(x) > limit:
                raise ApiError(400, f"input {i} is {len(x)} tokens; the model's context is {limit}", param="input",
                               code="context_length_exceeded")
        server.metrics.request()
        vectors = await asyncio.to_thread(engine.call, lambda: embed_ids(server.llm.model, ids, body.pooling))
        data = [{"object": "embedding", "index": i,
                 "embedding": to_base64(v) if body.encoding_format == "base64" else v.tolist()}
                for i, v in enumerate(vectors)]
        n = sum(len(x) for x in ids)
        return {"object": "list", "data": data, "model": server.model_id,
                "usage": {"prompt_tokens": n, "total_tokens": n}}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        body = validate(ChatRequest, await read_json(request, cfg.max_body_bytes))
        server.ready_engine()
        server.check_model(body.model)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in body.messages]
        try:
            ids = server.llm.tokenizer.encode_chat(messages, add_generation_prompt=True)
        except Exception as e:  # the checkpoint's template rejects the conversation (e.g. role order)
            raise ApiError(400, f"messages: the chat template rejected them ({str(e).splitlines()[0]})",
                           param="messages") from None
        if body.top_logprobs is not None and not body.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        return await run_generation(request, body, [ids], body.max_completion_tokens or body.max_tokens,
                                    logprobs, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = validate(CompletionRequest, await read_json(request, cfg.max_body_bytes))
        server.ready_engine()
        server.check_model(body.model)
        p = body.prompt
        tok = server.llm.tokenizer
        if isinstance(p, str):
            prompts = [tok.encode(p)]
        elif isinstance(p[0], str):
            prompts = [tok.encode(x) for x in p]
        elif isinstance(p[0], int):
            prompts = [server.check_ids(p, "prompt")]
        else:
            prompts = [server.check_ids(x, "prompt") for x in p]
        return await run_generation(request, body, prompts, body.max_tokens, body.logprobs, chat=False)

    async def run_generation(request: Request, body: Any, prompts: list[list[int]], max_new: int | None,
                             logprobs: int | None, chat: bool) -> Response:
        engine = server.ready_engine()
        tok = server.llm.tokenizer
        params = [server.sampling(body, len(ids), max_new) for ids in prompts]
        bias = server.logit_bias(body.logit_bias)
        grammar = None
        if body.response_format is not None:
            try:
                grammar = server.grammars.grammar_for(body.response_format)
            except EdgeLLMError as e:
                raise ApiError(400, str(e), param="response_format") from None
        if engine.queue_full():
            server.metrics.rejected()
            raise ApiError(503, "the server is busy: too many queued requests", type_="server_error",
                           code="queue_full", headers={"Retry-After": "2"})
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        reqs = []
        for pi, ids in enumerate(prompts):
            for i in range(body.n):
                index = pi * body.n + i
                p = SamplingParams(**{**params[pi].__dict__, "seed": None if body.seed is None else body.seed + i})

                def emit(kind: str, payload: Any, index: int = index) -> None:
                    loop.call_soon_threadsafe(events.put_nowait, (index, kind, payload))

                matcher = server.grammars.matcher(grammar) if grammar else None
                reqs.append(EngineRequest(ids, p, emit, logprobs, bias, matcher))
        for r in reqs:
            server.metrics.request()
            engine.submit(r)
        rid = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        shaper = Shaper(rid, server.model_id, chat, tok, logprobs, body.n)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(stream(events, reqs, shaper, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            results = await collect(request, events, len(reqs))
        finally:
            for r in reqs:
                r.cancelled = True  # no-op for finished ones; frees the rows of a client that went away
        return JSONResponse(shaper.response(results))

    async def collect(request: Request, events: asyncio.Queue, n: int) -> dict[int, dict[str, Any]]:
        results: dict[int, dict[str, Any]] = {i: {"tokens": [], "done": None} for i in range(n)}
        finished = 0
        while finished < n:
            try:
                index, kind, payload = await asyncio.wait_for(events.get(), timeout=1.0)
            except TimeoutError:
                if await request.is_disconnected():
                    raise ApiError(499, "client disconnected") from None
                continue
            if kind == "tokens":
                results[index]["tokens"] += payload
            elif kind == "done":
                results[index]["done"] = payload
                finished += 1
            else:
                raise ApiError(500, payload, type_="server_error")
        return results

    async def stream(events: asyncio.Queue, reqs: list[EngineRequest], shaper: Shaper,
                     include_usage: bool) -> AsyncIterator[str]:
        try:
            for i in range(len(reqs)):
                first = shaper.first_chunk(i)
                if first is not None:
                    yield sse(first)
            finished = 0
            while finished < len(reqs):
                index, kind, payload = await events.get()
                if kind == "tokens":
                    yield sse(shaper.chunk(index, payload, None))
                elif kind == "done":
                    finished += 1
                    shaper.count_prompt(index, payload)
                    yield sse(shaper.chunk(index, [], payload["finish_reason"]))
                else:
                    yield sse(error_body(payload, "server_error"))
                    return
            if include_usage:
                yield sse(shaper.usage_chunk())
            yield "data: [DONE]\n\n"
        finally:
            for r in reqs:
                r.cancelled = True

    return app


def sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class Shaper:
    """Builds OpenAI's response and chunk objects for chat.completion(.chunk) and text_completion."""

    def __init__(self, rid: str, model: str, chat: bool, tokenizer: Any, logprobs: int | None, n: int) -> None:
        self.n = n
        self.rid, self.model, self.chat, self.tok, self.logprobs = rid, model, chat, tokenizer, logprobs
        self.created = int(time.time())
        self.prompt_by_index: dict[int, int] = {}
        self.completion_by_index: dict[int, int] = {}
        self.cached_by_index: dict[int, int] = {}
        self.offsets: dict[int, int] = {}

    def _head(self) -> dict[str, Any]:
        kind = "chat.completion" if self.chat else "text_completion"
        return {"id": self.rid, "object": kind, "created": self.created, "model": self.model}

    def _top(self, top: list[tuple[int, float]] | None) -> list[tuple[str, float]]:
        return [(self.tok.decode([t]), lp) for t, lp in (top or [])]

    def logprob_block(self, index: int, toks: list[TokenOut]) -> dict[str, Any] | None:
        toks = [t for t in toks if t.logprob is not None]
        if self.logprobs is None:
            return None
        if self.chat:
            return {"content": [{"token": t.text, "logprob": t.logprob, "bytes": piece_bytes(t.text),
                                 "top_logprobs": [{"token": s, "logprob": lp, "bytes": piece_bytes(s)}
                                                  for s, lp in self._top(t.top)]} for t in toks]}
        offsets = []
        for t in toks:
            offsets.append(self.offsets.get(index, 0))
            self.offsets[index] = offsets[-1] + len(t.text)
        return {"tokens": [t.text for t in toks], "token_logprobs": [t.logprob for t in toks],
                "top_logprobs": [dict(self._top(t.top)) for t in toks], "text_offset": offsets}

    def first_chunk(self, index: int) -> dict[str, Any] | None:
        if not self.chat:
            return None
        return {**self._head(), "object": "chat.completion.chunk",
                "choices": [{"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None}]}

    def chunk(self, index: int, toks: list[TokenOut], finish: str | None) -> dict[str, Any]:
        text = "".join(t.text for t in toks)
        lp = self.logprob_block(index, toks) if toks else None
        reason = None if finish is None else ("length" if finish == "length" else "stop")
        if self.chat:
            delta = {"content": text} if toks else {}
            choice = {"index": index, "delta": delta, "logprobs": lp, "finish_reason": reason}
            return {**self._head(), "object": "chat.completion.chunk", "choices": [choice]}
        return {**self._head(), "choices": [{"index": index, "text": text, "logprobs": lp, "finish_reason": reason}]}

    def count_prompt(self, index: int, done: dict[str, Any]) -> None:
        self.prompt_by_index[index] = done["prompt_tokens"]
        self.completion_by_index[index] = done["completion_tokens"]
        self.cached_by_index[index] = done["cached_tokens"]

    def usage(self) -> dict[str, Any]:
        # the n choices of one prompt count its tokens once, as OpenAI does; each prompt of a list counts
        prompt = cached = 0
        for first in range(0, max(self.prompt_by_index, default=-1) + 1, self.n):
            choices = [i for i in range(first, first + self.n) if i in self.prompt_by_index]
            if choices:
                prompt += self.prompt_by_index[choices[0]]
                cached += max(self.cached_by_index[i] for i in choices)
        completion = sum(self.completion_by_index.values())
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": cached}}

    def usage_chunk(self) -> dict[str, Any]:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._head(), "object": kind, "choices": [], "usage": self.usage()}

    def response(self, results: dict[int, dict[str, Any]]) -> dict[str, Any]:
        choices = []
        for index, r in sorted(results.items()):
            self.count_prompt(index, r["done"])
            text = "".join(t.text for t in r["tokens"])
            lp = self.logprob_block(index, r["tokens"])
            reason = "length" if r["done"]["finish_reason"] == "length" else "stop"
            if self.chat:
                choices.append({"index": index, "message": {"role": "assistant", "content": text}, "logprobs": lp,
                                "finish_reason": reason})
            else:
                choices.append({"index": index, "text": text, "logprobs": lp, "finish_reason": reason})
        return {**self._head(), "choices": choices, "usage": self.usage()}

