"""The `deft` command line."""

from __future__ import annotations

import argparse
import sys

from deft_common import __version__

from .bench import add_bench_command
from .demo import add_demo_command
from .density import add_density_command
from .sparsify import add_sparsify_command
from .processes import ending_children_on_sigterm, quiet_imports

INTERRUPTED = 130  # the exit status of a command ended by Ctrl-C (128 + SIGINT), as shells report it


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deft",
        description="DEFT: Density-Efficient Fine-Tuning. A density loss that makes transformer MLP activations sparse.",
    )
    parser.add_argument("--version", action="version", version=f"deft {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_demo_command(commands)
    add_density_command(commands)
    add_bench_command(commands)
    add_sparsify_command(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        with quiet_imports(getattr(args, "model", None), getattr(args, "adapter", None)), ending_children_on_sigterm():
            return args.handler(args)
    except KeyboardInterrupt:
        # Ctrl-C: one line, not a traceback; the training subprocess is already ended (in_subprocess). The line
        # starts afresh: a subprocess's progress bar (or the terminal's ^C) may have left the cursor mid-line.
        print(f"\ndeft {args.command}: interrupted", file=sys.stderr)
        return INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
