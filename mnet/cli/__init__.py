"""The command line: parses options, calls the library, prints. No mathematics here; one module per subcommand.

Every subcommand exits 0 on success; bad input prints one line ``mnet <command>: error: ...`` on stderr, with no
traceback, and exits 2 (``mnet check`` exits 1 when the gradients disagree); a defect of mnet's own prints one
line too and exits 3 (``MNET_TRACEBACK=1`` shows its traceback).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from mnet.cli import bench, check, evaluate, launch, predict, train
from mnet.cli.common import EXIT_DISAGREE, EXIT_ERROR, EXIT_INTERNAL, Parser, UsageError
from mnet.errors import DivergenceError, MnetError


def build_parser() -> argparse.ArgumentParser:
    """The parser of every subcommand; each subcommand's module adds its own options."""
    parser = Parser(prog="mnet", description="Hand-derived neural network gradients, checked against jax.grad.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for subcommand in (check, train, evaluate, predict, launch, bench):
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
    except Exception as error:  # a defect of mnet's own: still one line, and the traceback on request
        if os.environ.get("MNET_TRACEBACK"):
            raise
        print(
            f"{prog}: internal error ({type(error).__name__}: {' '.join(str(error).split())}); please report it, "
            "with the traceback that MNET_TRACEBACK=1 prints",
            file=sys.stderr,
        )
        return EXIT_INTERNAL
