"""`python -m edgellm.quant quantize ...`: the quantize verb on its own (same as `edgellm quantize`)."""

from __future__ import annotations

import argparse
import sys

from ..errors import EdgeLLMError
from .cli import register


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edgellm.quant")
    register(parser.add_subparsers(dest="command", required=True, metavar="VERB"))
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except EdgeLLMError as e:
        print(f"edgellm {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
