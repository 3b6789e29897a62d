"""The ``events-bridge`` command: the sub-commands assembled, and errors turned into exit codes.

Exit codes: 0 success; 1 a command that could not do its work (a file it cannot read, a broker
it cannot reach, a refused delivery); 2 bad options (argparse); 78 (EX_CONFIG) an invalid
configuration; 130 Ctrl-C. A user's mistake ends with one clear line on stderr, never a
traceback.

Each sub-command is a module of this package: ``add_<command>`` declares its options (and sets
``run``), ``run_<command>`` runs it. A command imports its heavy modules only when it runs, so
``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from bridge import __version__
from bridge.cli.check import add_check_config
from bridge.cli.declare import add_declare
from bridge.cli.journal import add_journal
from bridge.cli.keys import add_keys
from bridge.cli.options import QUICK_START
from bridge.cli.quarantine import add_quarantine
from bridge.cli.route import add_route
from bridge.cli.serve import add_serve
from bridge.cli.simulate import add_simulate
from bridge.cli.tail import add_tail
from bridge.errors import ConfigError, UsageError

EX_CONFIG = 78

COMMANDS = (
    add_serve,
    add_check_config,
    add_declare,
    add_route,
    add_simulate,
    add_keys,
    add_tail,
    add_journal,
    add_quarantine,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="events-bridge",
        description="Receive Adobe I/O Events webhooks, verify their signatures, and republish "
        "each event to RabbitMQ with publisher confirms.",
        epilog=QUICK_START,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"events-bridge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Commands say what went wrong in one line of their own; libraries' logs (aiormq prints a
    # traceback-like line on a refused connection) stay quiet. `serve` configures real logging.
    logging.basicConfig(level=logging.CRITICAL)
    try:
        return int(args.run(args))
    except ConfigError as exc:
        _report_config_error(args, exc)
        return EX_CONFIG
    except UsageError as exc:
        print(f"events-bridge: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _report_config_error(args: argparse.Namespace, exc: ConfigError) -> None:
    """check-config: every problem, one line each; any other command: the first one."""
    if args.command == "check-config":
        for problem in exc.problems:
            print(f"{args.config}: {problem}", file=sys.stderr)
        return
    more = f" (and {len(exc.problems) - 1} more: run check-config)" if len(exc.problems) > 1 else ""
    print(f"events-bridge: invalid config {args.config}: {exc.problems[0]}{more}", file=sys.stderr)
