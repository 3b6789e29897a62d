"""Example consumer with the bridge's helper: react to failed Lightroom and Photoshop jobs.

    python deploy/examples/python/consumer.py            # needs `make run` (or a broker) first

It declares its own work queue `examples.failed-jobs` (`EXAMPLE_QUEUE` names another; quorum,
dead letters to `examples.failed-jobs.dead`), binds it to `adobe.events` with `*.failed`, and
handles each event with retries: a handler that raises is retried after 10 s, three times, then
dead-lettered.
In production, declare the queue in the bridge's `topology:` instead and keep only the handler.

With `EXAMPLE_OFFSET` (`first`, `last`, `next`, an offset, `12h`, `2025-01-31T08:00:00Z`) it
declares nothing and reads `EXAMPLE_QUEUE`, a stream of the bridge's topology, from there.
"""

from __future__ import annotations

import asyncio
import os
import signal

import aio_pika

from bridge.consumer import Consumer, PermanentFailure, ReceivedEvent
from bridge.streams import parse_offset

URL = os.environ.get("BRIDGE_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
QUEUE = os.environ.get("EXAMPLE_QUEUE") or "examples.failed-jobs"
OFFSET = parse_offset(os.environ["EXAMPLE_OFFSET"]) if os.environ.get("EXAMPLE_OFFSET") else None


async def handle(event: ReceivedEvent) -> None:
    if event.job is None:
        raise PermanentFailure(f"{event.event_code} is not a job-status event")
    at = "" if event.offset is None else f", offset {event.offset}"
    print(
        f"job {event.job.job_id} {event.job.status} ({event.event_code}, attempt "
        f"{event.attempt}{at})",
        flush=True,
    )
    for output in event.job.outputs:
        if output.status == "failed":
            print(f"  {output.input or '(no input)'}: {output.errors}", flush=True)


async def declare() -> None:
    connection = await aio_pika.connect(URL)
    async with connection:
        channel = await connection.channel()
        dead = await channel.declare_exchange(
            f"{QUEUE}.dlx", aio_pika.ExchangeType.FANOUT, durable=True
        )
        dead_queue = await channel.declare_queue(
            f"{QUEUE}.dead", durable=True, arguments={"x-queue-type": "quorum"}
        )
        await dead_queue.bind(dead)
        queue = await channel.declare_queue(
            QUEUE,
            durable=True,
            arguments={"x-queue-type": "quorum", "x-dead-letter-exchange": f"{QUEUE}.dlx"},
        )
        await queue.bind("adobe.events", routing_key="*.failed")


async def declare_when_ready(seconds: float = 120.0) -> None:
    """Declare once the broker answers and the bridge has declared ``adobe.events``: started
    beside the bridge (a sidecar Pod, compose), this may start first."""
    deadline = asyncio.get_running_loop().time() + seconds
    while True:
        try:
            await declare()
        except (OSError, aio_pika.exceptions.AMQPError) as exc:
            if asyncio.get_running_loop().time() > deadline:
                raise
            print(f"waiting for the broker and adobe.events ({type(exc).__name__})", flush=True)
            await asyncio.sleep(2.0)
        else:
            return


async def main() -> None:
    if OFFSET is None:
        await declare_when_ready()
    consumer = Consumer(
        URL, QUEUE, handle, prefetch=16, max_attempts=3, retry_delay=10, offset=OFFSET
    )
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, consumer.stop)
    what = "bound to adobe.events with '*.failed'" if OFFSET is None else f"from {OFFSET}"
    print(f"consuming {QUEUE} ({what}); Ctrl-C stops", flush=True)
    await consumer.run()
    print(f"stopped: {consumer.counts}")


if __name__ == "__main__":
    asyncio.run(main())
