"""``events-bridge tail``: watch what the bridge publishes, from a throw-away queue.

Binds a server-named, exclusive, auto-delete queue to the events exchange with a binding key
(default ``#``, everything) and prints each message: routing key, properties, headers, body.
The queue disappears when tail stops, so it never keeps messages nobody reads. Consumes only:
it never publishes, and it declares no exchange (a missing one is reported, not created).
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from datetime import datetime
from typing import Any, TextIO

import aio_pika
import aio_pika.abc
import orjson
from aio_pika.exceptions import ChannelNotFoundEntity

from bridge.config_types import BrokerConfig
from bridge.errors import UsageError
from bridge.nodes import connect_first

PROPERTIES = ("content_type", "delivery_mode", "message_id", "type", "timestamp", "app_id")


def describe(message: aio_pika.abc.AbstractIncomingMessage) -> dict[str, Any]:
    props: dict[str, Any] = {}
    for name in PROPERTIES:
        value = getattr(message, name)
        if isinstance(value, datetime):
            value = value.isoformat()
        elif hasattr(value, "value"):  # DeliveryMode
            value = value.value
        props[name] = value
    headers = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in message.headers.items()}
    return {
        "exchange": message.exchange,
        "routing_key": message.routing_key,
        "properties": props,
        "headers": headers,
        "body": message.body.decode("utf-8", "replace"),
    }


def render(info: dict[str, Any], out: TextIO) -> None:
    out.write(f"--- {info['exchange']} {info['routing_key']}\n")
    for name, value in info["properties"].items():
        out.write(f"  {name}: {value}\n")
    for name, value in sorted(info["headers"].items()):
        out.write(f"  header {name}: {value}\n")
    body = info["body"]
    with contextlib.suppress(orjson.JSONDecodeError):
        body = orjson.dumps(orjson.loads(body), option=orjson.OPT_INDENT_2).decode()
    out.write("  body:\n" + "\n".join("    " + line for line in body.splitlines()) + "\n")
    out.flush()


async def tail(
    broker: BrokerConfig,
    exchange: str,
    binding_key: str,
    *,
    count: int = 0,
    seconds: float = 0.0,
    as_json: bool = False,
) -> int:
    """Print messages until ``count`` arrived or ``seconds`` passed (0: no limit)."""
    if not binding_key or len(binding_key.encode("utf-8")) > 255:
        raise UsageError("the binding key must be 1 to 255 bytes")
    connection = await connect_first(broker, "bridge-tail")
    seen = 0
    async with connection:
        channel = await connection.channel()
        try:
            source = await channel.get_exchange(exchange, ensure=True)
        except ChannelNotFoundEntity:
            raise UsageError(
                f"exchange {exchange!r} does not exist: start `events-bridge serve` "
                "or run `events-bridge declare` first"
            ) from None
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(source, routing_key=binding_key)
        print(
            f"tail: bound {queue.name} to {exchange} with {binding_key!r}; waiting for "
            "messages (Ctrl-C stops)",
            file=sys.stderr,
            flush=True,
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds if seconds > 0 else None
        async with queue.iterator() as messages:
            while not count or seen < count:
                wait = None if deadline is None else deadline - loop.time()
                if wait is not None and wait <= 0:
                    break
                try:
                    message = await asyncio.wait_for(anext(messages), wait)
                except TimeoutError:
                    break
                async with message.process():
                    info = describe(message)
                    if as_json:
                        sys.stdout.write(orjson.dumps(info, default=str).decode() + "\n")
                        sys.stdout.flush()
                    else:
                        render(info, sys.stdout)
                seen += 1
    return seen
