"""Topology on the broker: declare what the config names, or check it is there (passive).

Part of the deliver step; ``bridge.link`` calls it on every connect and on a reload, and
``events-bridge declare`` from the command line. The topology itself (exchanges, queues,
bindings) is parsed from YAML by ``bridge.topology``.
"""

from __future__ import annotations

import aio_pika
import aio_pika.abc

from bridge.topology import Topology


def deprecations(topology: Topology) -> list[str]:
    """What ``topology`` asks of the broker that RabbitMQ 4.0 deprecates: it still works there,
    with a warning in the broker's log, but later versions refuse it, and a broker that refuses
    one closes the whole connection (``541``), not only the channel. One line each."""
    found: list[str] = []
    for queue in topology.queues:
        if queue.type == "classic" and not queue.durable:
            found.append(
                f"queue {queue.name!r}: a classic queue with durable: false is a transient "
                "non-exclusive queue, deprecated by RabbitMQ 4.0 and refused by later versions; "
                "make it durable"
            )
        if any(name == "x-queue-master-locator" for name, _ in queue.arguments):
            found.append(
                f"queue {queue.name!r}: x-queue-master-locator is deprecated by RabbitMQ 4.0 "
                "and refused by later versions; use x-queue-leader-locator"
            )
    return found


class TopologyMissing(Exception):
    """``topology.passive`` is set and the broker lacks something the topology names."""


async def declare_topology(channel: aio_pika.abc.AbstractChannel, topology: Topology) -> None:
    """Declare every exchange, queue and binding of ``topology``; idempotent.

    A declaration that differs from what exists (another type or arguments) fails with the
    broker's PRECONDITION_FAILED, which names the entity: nothing is changed silently.
    """
    for spec in topology.exchanges:
        await channel.declare_exchange(
            spec.name,
            aio_pika.ExchangeType(spec.type),
            durable=spec.durable,
            auto_delete=spec.auto_delete,
            internal=spec.internal,
            arguments=spec.declare_arguments(),
        )
    for queue in topology.queues:
        await channel.declare_queue(
            queue.name, durable=queue.durable, arguments=queue.declare_arguments()
        )
    for binding in topology.bindings:
        bound = await channel.get_queue(binding.queue, ensure=False)
        await bound.bind(
            binding.exchange,
            routing_key=binding.routing_key,
            arguments=dict(binding.arguments) or None,
        )


async def check_topology(
    connection: aio_pika.abc.AbstractConnection, topology: Topology
) -> list[str]:
    """With ``passive: true``: what the topology names that the broker does not have."""
    missing: list[str] = []
    wanted = [("exchange", e.name) for e in topology.exchanges] + [
        ("queue", q.name) for q in topology.queues
    ]
    for kind, name in wanted:
        channel = await connection.channel()  # a 404 closes the channel: one per check
        try:
            if kind == "exchange":
                await channel.declare_exchange(name, passive=True)
            else:
                await channel.declare_queue(name, passive=True)
        except aio_pika.exceptions.ChannelNotFoundEntity:
            missing.append(f"{kind} {name!r}")
        finally:
            if not channel.is_closed:
                await channel.close()
    return missing
