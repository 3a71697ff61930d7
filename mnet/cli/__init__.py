"""The command line: parses options, calls the library, prints. No mathematics here; one module per subcommand.

Every subcommand exits 0 on success; bad input prints one line ``mnet <command>: error: ...`` on stderr, with no
traceback, and exits 2 (``mnet check`` exits 1 when the gradients disagree).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from mnet.cli import bench, check, launch, train
from mnet.cli.common import EXIT_DISAGREE, EXIT_ERROR, Parser, UsageError
from mnet.errors import DivergenceError, MnetError


def build_parser() -> argparse.ArgumentParser:
    """The parser of every subcommand; each subcommand's module adds its own options."""
    parser = Parser(prog="mnet", description="Hand-derived neural network gradients, checked against jax.grad.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for subcommand in (check, train, launch, bench):
        subcommand.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), "")
    prog = f"mnet {command}".strip()
    try:
        args = build_parser().parse_args(argv)
        return args.run(args)
    except (UsageError, MnetError, ValueError, OSError) as error:
        # One line whatever the message holds (JAX's own messages often span several).
        print(f"{prog}: error: {' '.join(str(error).split())}", file=sys.stderr)
        return EXIT_DISAGREE if isinstance(error, DivergenceError) else EXIT_ERROR
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
