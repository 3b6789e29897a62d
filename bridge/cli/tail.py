"""``events-bridge tail``: print each message published to the events exchange, through a
temporary queue of its own (:mod:`bridge.tail`)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib

from bridge.cli.options import Subparsers, config_arg


def add_tail(sub: Subparsers) -> None:
    p = sub.add_parser(
        "tail",
        help="print each message published to the events exchange",
        description="Bind a temporary queue to the events exchange and print "
        "each message (properties, headers, body).",
    )
    config_arg(p)
    p.add_argument(
        "binding_key",
        nargs="?",
        default="#",
        metavar="BINDING_KEY",
        help="topic binding key, e.g. '*.failed' (default: '#', everything)",
    )
    p.add_argument("--count", type=int, default=0, metavar="N", help="stop after N messages")
    p.add_argument(
        "--timeout", type=float, default=0.0, metavar="SECONDS", help="stop after SECONDS"
    )
    p.add_argument("--json", action="store_true", help="one JSON object per message")
    p.set_defaults(run=run_tail)


def run_tail(args: argparse.Namespace) -> int:
    from bridge.config import load_config
    from bridge.tail import tail

    config = load_config(args.config, sections=("broker",))
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(
            tail(
                config.broker,
                config.broker.exchange,
                args.binding_key,
                count=args.count,
                seconds=args.timeout,
                as_json=args.json,
            )
        )
    return 0
