"""``events-bridge check-config``: validate the configuration; its problems are printed by
:func:`bridge.cli.main`, one line each (exit 78)."""

from __future__ import annotations

import argparse

from bridge.cli.options import Subparsers, config_arg


def add_check_config(sub: Subparsers) -> None:
    p = sub.add_parser(
        "check-config",
        help="validate the configuration and exit",
        description="Print every problem with its YAML path and line. "
        "Exit 0 when valid, 78 when not.",
    )
    config_arg(p)
    p.set_defaults(run=run_check_config)


def run_check_config(args: argparse.Namespace) -> int:
    from bridge.config import load_config
    from bridge.link import redacted

    config = load_config(args.config)
    regs = ", ".join(f"{r.name} at {r.path}" for r in config.registrations)
    print(
        f"{args.config}: valid ({len(config.registrations)} registration(s): {regs}; "
        f"broker {redacted(config.broker.url)}; key base {config.verification.key_base_url})"
    )
    return 0
