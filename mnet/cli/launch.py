"""``mnet launch``: run a command as N local processes joined into one group."""

from __future__ import annotations

import argparse

from mnet.cli.common import positive_int
from mnet.training import launch


def run_launch(args: argparse.Namespace) -> int:

    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    return launch.launch(args.processes, command, local_devices=args.local_devices, grace_seconds=args.grace)


def add_parser(commands: argparse._SubParsersAction) -> None:
    """``mnet launch`` and its options."""
    launch = commands.add_parser(
        "launch", help="run a command as N processes joined into one group on this machine (mnet launch -n 2 -- train)"
    )
    launch.add_argument("-n", "--processes", type=positive_int, required=True, metavar="N")
    launch.add_argument(
        "--local-devices", type=positive_int, default=None, metavar="K", help="give each process K CPU devices"
    )
    launch.add_argument(
        "--grace", type=float, default=30.0, metavar="SECONDS", help="after one process fails, kill the rest after this"
    )
    launch.add_argument("command", nargs=argparse.REMAINDER, help="an mnet subcommand (train ...) or any command")
    launch.set_defaults(run=run_launch)
