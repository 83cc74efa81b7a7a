"""The `serve` verb."""

from __future__ import annotations

import argparse
import os
import sys

from ..errors import InvalidArgumentError


def register(sub: argparse._SubParsersAction) -> None:
    from ..cli import add_model_args

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (chat, completions, embeddings) with "
                                     "continuous batching")
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("EDGELLM_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $EDGELLM_API_KEY; /health stays open)")
    p.add_argument("--parallel", type=int, default=4, help="sequences decoded together (KV-cache rows)")
    p.add_argument("--ctx-size", type=int, default=2048, help="tokens per sequence (prompt + answer)")
    p.add_argument("--max-queue", type=int, default=64, help="waiting requests before 503 + Retry-After")
    p.add_argument("--max-body", type=int, default=4 << 20, help="largest request body in bytes (else 413)")
    p.add_argument("--cors", action="append", default=[], metavar="ORIGIN", help="allowed CORS origin (repeatable)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, the physical cores)")
    p.add_argument("--model-id", default=None, help="the model name clients send (default: the file/folder name)")
    p.add_argument("--speculative", choices=["lookup"], default=None,
                   help="lookup: each request drafts from its own prompt and answer; the drafts are "
                        "verified in the batched step (same answers, fewer steps when the answer copies its input)")
    p.add_argument("--draft-k", type=int, default=None,
                   help="tokens per draft, 1..16; default adaptive: per request and batch size")
    p.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    if args.threads is not None:
        if args.threads < 1:
            raise InvalidArgumentError(f"--threads must be >= 1 (got {args.threads})")
        import torch

        torch.set_num_threads(args.threads)
    for name, low in (("--parallel", 1), ("--ctx-size", 16), ("--max-queue", 0), ("--max-body", 1024),
                      ("--port", 0)):
        value = getattr(args, name[2:].replace("-", "_"))
        if value < low:
            raise InvalidArgumentError(f"{name} must be >= {low} (got {value})")
    if args.draft_k is not None and args.speculative is None:
        raise InvalidArgumentError("--draft-k needs --speculative lookup")
    from ..speculative import check_k

    check_k(args.draft_k)
    import uvicorn

    from .app import ServerConfig, create_app

    cfg = ServerConfig(model=args.model, dtype=args.dtype, parallel=args.parallel, ctx_size=args.ctx_size,
                       max_queue=args.max_queue, api_key=args.api_key, max_body_bytes=args.max_body,
                       cors=tuple(args.cors), model_id=args.model_id, adapter=args.adapter, threads=args.threads,
                       speculative=args.speculative, draft_k=args.draft_k)
    app = create_app(cfg)
    print(f"edgellm: serving on http://{args.host}:{args.port} (OpenAI API under /v1; GET /health is 503 until "
          f"the model is loaded)", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False)
    return 0
