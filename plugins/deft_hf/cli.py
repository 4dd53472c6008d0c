"""The `deft` command line."""

from __future__ import annotations

import argparse
import sys

from deft_common import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deft",
        description="DEFT: Density-Efficient Fine-Tuning. A density loss that makes transformer MLP activations sparse.",
    )
    parser.add_argument("--version", action="version", version=f"deft {__version__}")
    parser.add_subparsers(dest="command", metavar="COMMAND")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
