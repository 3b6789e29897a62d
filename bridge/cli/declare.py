"""``events-bridge declare``: declare the configured exchanges, queues and bindings (with
``topology.passive``, only check that they exist), then print what was done."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import TYPE_CHECKING

from bridge.cli.options import Subparsers, config_arg
from bridge.errors import UsageError

if TYPE_CHECKING:
    from bridge.config import Config


def add_declare(sub: Subparsers) -> None:
    p = sub.add_parser(
        "declare",
        help="declare the exchanges and queues, then exit",
        description="Declare adobe.events (topic, alternate exchange "
        "adobe.unrouted), adobe.unrouted (fanout) and its queue.",
    )
    config_arg(p)
    p.set_defaults(run=run_declare)


def run_declare(args: argparse.Namespace) -> int:
    from bridge.config import load_config
    from bridge.declare import deprecations

    config = load_config(args.config, sections=("broker", "topology"))
    for problem in deprecations(config.topology):
        print(f"warning: {problem}", file=sys.stderr)
    missing = asyncio.run(_declare(config))
    if missing:
        raise UsageError(", ".join(missing) + " missing on the broker (topology.passive is true)")
    if config.topology.passive:
        _print_checked(config)
    else:
        _print_declared(config)
    return 0


async def _declare(config: Config) -> list[str]:
    """Declare (or, passive, check) the topology; what is missing on the broker."""
    import aio_pika

    from bridge.declare import check_topology, declare_topology
    from bridge.nodes import connect_first

    topology = config.topology
    connection = await connect_first(config.broker, "events-bridge declare")
    async with connection:
        if topology.passive:
            return await check_topology(connection, topology)
        try:
            await declare_topology(await connection.channel(), topology)
        except (aio_pika.exceptions.AMQPError, ValueError, TypeError) as exc:
            raise UsageError(f"declare failed: {exc}") from None
    return []


def _print_checked(config: Config) -> None:
    topology = config.topology
    for e in topology.exchanges:
        print(f"exists: exchange {e.name}")
    for q in topology.queues:
        print(f"exists: queue {q.name}")
    print("(passive: only existence is checked, not types, arguments or bindings)")


def _print_declared(config: Config) -> None:
    topology = config.topology
    verb = "declared"
    for e in topology.exchanges:
        ae = f", alternate exchange {e.alternate_exchange}" if e.alternate_exchange else ""
        print(f"{verb} exchange {e.name} ({e.type}{ae})")
    for q in topology.queues:
        dlx = (
            f", dead letters to {q.dead_letter_exchange!r}"
            if q.dead_letter_exchange is not None
            else ""
        )
        print(f"{verb} queue {q.name} ({q.type}{dlx})")
    for b in topology.bindings:
        print(f"{verb} binding {b.exchange} -> {b.queue} with {b.routing_key!r}")
