"""The consumer helper reading a stream that the bridge publishes to: from the first event (twice:
a replay), from an offset, the last chunk, the next event, a point in time; handler failures
retried in place, then skipped; a reconnect resuming where reading stood."""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aio_pika
import orjson
import pytest
from yarl import URL

from bridge.app import create_app
from bridge.config import BrokerConfig, parse_config
from bridge.consumer import Consumer, PermanentFailure, ReceivedEvent
from bridge.streams import StreamOffset
from tests.helpers import CLIENT_ID, EVENTS, SigningKey, key_folder
from tests.proxy import Proxy

LIGHTROOM = orjson.loads((EVENTS / "imaging_lightroom-job-status_succeeded.json").read_bytes())


def stream_yaml(p: str) -> str:
    return f"""
broker:
  url: ${{BRIDGE_AMQP_URL}}
  exchange: {p}.events
  unrouted_exchange: {p}.unrouted
  unrouted_queue: {p}.unrouted
verification:
  key_base_url: ${{BRIDGE_KEY_BASE_URL}}
registrations:
  - {{name: default, path: /webhook, client_ids: [{CLIENT_ID}]}}
outbox:
  mode: "off"
topology:
  exchanges:
    - {{name: {p}.events, type: topic, alternate_exchange: {p}.unrouted}}
    - {{name: {p}.unrouted, type: fanout}}
  queues:
    - {{name: {p}.unrouted}}
    - name: {p}.history
      type: stream
      max_age: 1D
      max_length_bytes: 100_000_000
      stream_max_segment_size_bytes: 1_000_000
  bindings:
    - {{exchange: {p}.unrouted, queue: {p}.unrouted}}
    - {{exchange: {p}.events, queue: {p}.history, routing_key: "#"}}
"""


@dataclasses.dataclass
class Bridge:
    """A bridge in this process publishing to the stream ``stream``."""

    amqp_url: str
    stream: str
    post: Callable[[bytes, dict[str, str]], Awaitable[int]]
    signer: SigningKey

    async def publish(self, *event_ids: str) -> None:
        for event_id in event_ids:
            body = orjson.dumps({**LIGHTROOM, "recipientclientid": CLIENT_ID, "event_id": event_id})
            assert await self.post(body, self.signer.headers(body)) == 200


@pytest.fixture
async def bridge(
    amqp_url: str, aiohttp_client: Any, forget_topology: list[BrokerConfig], tmp_path: Path
) -> AsyncIterator[Bridge]:
    p = f"stream.{uuid.uuid4().hex[:8]}"
    signer = SigningKey.generate()
    env = {"BRIDGE_AMQP_URL": amqp_url, "BRIDGE_KEY_BASE_URL": key_folder(tmp_path, signer)}
    config = parse_config(stream_yaml(p), "t.yaml", env)
    forget_topology.append(config.broker)
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        client = await aiohttp_client(create_app(config))  # declares the topology: the stream too
        deadline = time.monotonic() + 15
        while (await client.get("/readyz")).status != 200:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
        await channel.declare_queue(f"{p}.history", passive=True)

        async def post(body: bytes, headers: dict[str, str]) -> int:
            status: int = (await client.post("/webhook", data=body, headers=headers)).status
            return status

        yield Bridge(amqp_url, f"{p}.history", post, signer)
        await channel.queue_delete(f"{p}.history")


async def wait_for(condition: Callable[[], bool], seconds: float = 15) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def read(
    url: str, stream: str, offset: StreamOffset, count: int, **options: Any
) -> tuple[list[ReceivedEvent], Consumer]:
    """Read ``count`` events from ``offset`` (and whatever else comes within 0.5 s)."""
    seen: list[ReceivedEvent] = []

    async def handle(event: ReceivedEvent) -> None:
        seen.append(event)

    consumer = Consumer(url, stream, handle, offset=offset, **options)
    await consumer.start()
    try:
        await wait_for(lambda: len(seen) >= count)
        await asyncio.sleep(0.5)
    finally:
        await consumer.close()
    return seen, consumer


async def test_a_stream_is_read_from_the_first_event_and_read_again(bridge: Bridge) -> None:
    ids = [f"first-{i}" for i in range(5)]
    await bridge.publish(*ids)
    first, consumer = await read(bridge.amqp_url, bridge.stream, "first", 5)
    assert [e.event_id for e in first] == ids
    assert [e.offset for e in first] == [0, 1, 2, 3, 4]
    assert {e.attempt for e in first} == {1}
    assert first[0].routing_key == "lightroom-job-status.succeeded"
    assert first[0].job is not None
    assert first[0].job.status == "succeeded"
    assert consumer.counts == {"handled": 5, "retried": 0, "skipped": 0, "duplicates": 0}
    # Reading consumed nothing: a new reader replays the same events, in the same order.
    again, _ = await read(bridge.amqp_url, bridge.stream, "first", 5, prefetch=1)
    assert [(e.event_id, e.offset) for e in again] == [(e.event_id, e.offset) for e in first]
    # Nothing was declared for the stream (no retry queue).
    connection = await aio_pika.connect(bridge.amqp_url)
    async with connection:
        with pytest.raises(aio_pika.exceptions.ChannelNotFoundEntity):
            await (await connection.channel()).declare_queue(f"{bridge.stream}.retry", passive=True)


async def test_a_reader_starts_at_an_offset_the_last_chunk_or_the_next_event(
    bridge: Bridge,
) -> None:
    ids = [f"offset-{i}" for i in range(5)]
    await bridge.publish(*ids)
    from_three, _ = await read(bridge.amqp_url, bridge.stream, 3, 2)
    assert [(e.event_id, e.offset) for e in from_three] == [("offset-3", 3), ("offset-4", 4)]
    # "last": from the last chunk written (a chunk: one or more messages), so the last event.
    last, _ = await read(bridge.amqp_url, bridge.stream, "last", 1)
    assert last[-1].event_id == "offset-4"
    assert [e.event_id for e in last] == ids[len(ids) - len(last) :]
    # "next": only what is published after the reader starts.
    seen: list[str] = []

    async def handle(event: ReceivedEvent) -> None:
        seen.append(event.event_id)

    consumer = Consumer(bridge.amqp_url, bridge.stream, handle, offset="next")
    await consumer.start()
    try:
        await asyncio.sleep(0.3)
        assert seen == []
        await bridge.publish("offset-5")
        await wait_for(lambda: len(seen) >= 1)
        await asyncio.sleep(0.3)
    finally:
        await consumer.close()
    assert seen == ["offset-5"]


async def test_a_reader_starts_at_a_point_in_time(bridge: Bridge) -> None:
    await bridge.publish("before-0", "before-1")
    await asyncio.sleep(1.5)  # AMQP 0-9-1 timestamps are whole seconds
    moment = datetime.now(UTC)
    await bridge.publish("after-0", "after-1")
    after, _ = await read(bridge.amqp_url, bridge.stream, moment, 2)
    assert [e.event_id for e in after] == ["after-0", "after-1"]
    everything = ["before-0", "before-1", "after-0", "after-1"]
    for ago in (timedelta(hours=1), "1h"):
        recent, _ = await read(bridge.amqp_url, bridge.stream, ago, 4)
        assert [e.event_id for e in recent] == everything


async def test_a_failing_handler_is_retried_in_place_then_skipped(bridge: Bridge) -> None:
    await bridge.publish("flaky", "broken", "poison")
    connection = await aio_pika.connect(bridge.amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await channel.default_exchange.publish(aio_pika.Message(b"not an event"), bridge.stream)
    attempts: dict[str, list[int]] = {}

    async def handle(event: ReceivedEvent) -> None:
        attempts.setdefault(event.event_id, []).append(event.attempt)
        if event.event_id == "poison":
            raise PermanentFailure("never")
        if event.event_id == "broken" or event.attempt == 1:
            raise RuntimeError("downstream is down")

    consumer = Consumer(
        bridge.amqp_url, bridge.stream, handle, offset="first", max_attempts=3, retry_delay=0.1
    )
    await consumer.start()
    try:
        await wait_for(lambda: consumer.counts["handled"] + consumer.counts["skipped"] >= 4)
    finally:
        await consumer.close()
    assert attempts == {"flaky": [1, 2], "broken": [1, 2, 3], "poison": [1]}
    assert consumer.counts == {"handled": 1, "retried": 3, "skipped": 3, "duplicates": 0}
    # Skipped is not gone: the stream keeps every message for the next reader.
    replay, _ = await read(bridge.amqp_url, bridge.stream, "first", 3)
    assert [e.event_id for e in replay] == ["flaky", "broken", "poison"]


async def test_after_a_reconnect_reading_resumes_after_what_was_handled(bridge: Bridge) -> None:
    broker = URL(bridge.amqp_url)
    proxy = Proxy(broker.host or "127.0.0.1", broker.port or 5672)
    await proxy.start()
    url = str(broker.with_host("127.0.0.1").with_port(proxy.port) % {"reconnect_interval": "0.2"})
    seen: list[str] = []

    async def handle(event: ReceivedEvent) -> None:
        seen.append(event.event_id)

    consumer = Consumer(url, bridge.stream, handle, offset="first")
    await bridge.publish("a", "b", "c")
    await consumer.start()
    try:
        await wait_for(lambda: len(seen) >= 3)
        assert consumer.stream is not None
        assert consumer.stream.resume_at == 3
        proxy.down()  # the connection is cut; the robust connection comes back
        await asyncio.sleep(0.5)
        proxy.up()
        await bridge.publish("d", "e")
        await wait_for(lambda: len(seen) >= 5)
        await asyncio.sleep(0.5)
    finally:
        await consumer.close()
        await proxy.stop()
    assert seen == ["a", "b", "c", "d", "e"]
    # It consumed again from offset 3, not from "first": nothing came twice.
    assert consumer.stream.passed_over == 0
    assert consumer.counts == {"handled": 5, "retried": 0, "skipped": 0, "duplicates": 0}
