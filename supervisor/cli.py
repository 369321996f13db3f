"""The `corral` command (SKELETON: `serve` is wired; the other commands are to implement).

Every command but `serve` is a client of the server's HTTP API at CORRAL_HOST.
"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="corral", description="Serve MLX language models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    from supervisor import server

    serve = sub.add_parser("serve", help="start the server")
    server.add_serve_arguments(serve)
    serve.set_defaults(func=server.run_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
