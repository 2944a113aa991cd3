"""`llmtp` command line: one module per command in coordinator/commands/ adds its arguments
and handler; LlmtpError becomes one line on stderr with exit code 2 (130 on Ctrl-C), and so
does a bad argument."""

import sys

import llmtp
from llmtp.common.errors import run_handler

from .commands import register_all
from .commands.arguments import Parser


def main(argv: list[str] | None = None) -> int:
    return run_handler(build_parser().parse_args(argv))


def build_parser() -> Parser:
    parser = Parser(prog="llmtp", description="Llama-2 inference split across worker processes.")
    parser.add_argument("--version", action="version", version=f"llmtp {llmtp.__version__}")
    register_all(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    return parser


if __name__ == "__main__":
    sys.exit(main())
