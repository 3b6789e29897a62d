"""The whole road on a real RabbitMQ: confirms, properties, unrouted, returns, nacks, outages."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aio_pika
import aio_pika.abc
import aiormq
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from yarl import URL

from bridge.app import create_app
from bridge.config import BrokerConfig, Config
from bridge.errors import BrokerUnavailable
from bridge.message import Outbound
from bridge.publisher import AmqpPublisher
from tests.broker_node import BrokerNode
from tests.helpers import (
    CLIENT_ID,
    EVENTS,
    FULL_AFTER_ONE,
    SigningKey,
    fanout_queue,
    key_folder,
    make_config,
)
from tests.proxy import Proxy
from tests.test_envelope import EXPECTED as SAMPLE_TABLE
from tests.test_envelope import H_CODE, H_ID

Client = TestClient[web.Request, web.Application]
LIGHTROOM = orjson.loads((EVENTS / "imaging_lightroom-job-status_succeeded.json").read_bytes())


def lightroom(event_id: str = "7b59cc70-88d7-4895-b204-87f5350a0cce", **extra: Any) -> bytes:
    return orjson.dumps(
        {**LIGHTROOM, "event_id": event_id, "recipient_client_id": CLIENT_ID, **extra}
    )


@pytest.fixture(scope="module")
def signer() -> SigningKey:
    return SigningKey.generate()


@pytest.fixture
async def consumer(amqp_url: str) -> AsyncIterator[aio_pika.abc.AbstractChannel]:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        yield await connection.channel()


async def bind_queue(
    channel: aio_pika.abc.AbstractChannel, exchange: str, key: str = "#"
) -> aio_pika.abc.AbstractQueue:
    queue = await channel.declare_queue(exclusive=True)
    await queue.bind(exchange, routing_key=key)
    return queue


async def take(
    queue: aio_pika.abc.AbstractQueue, count: int, seconds: float = 5.0
) -> list[aio_pika.abc.AbstractIncomingMessage]:
    """Exactly ``count`` messages (waiting up to ``seconds``), then check nothing more is there."""
    got: list[aio_pika.abc.AbstractIncomingMessage] = []
    deadline = time.monotonic() + seconds
    while len(got) < count and time.monotonic() < deadline:
        message = await queue.get(fail=False, no_ack=True)
        if message is None:
            await asyncio.sleep(0.05)
        else:
            got.append(message)
    assert len(got) == count, f"expected {count} messages, got {len(got)}"
    assert await queue.get(fail=False, no_ack=True) is None, "more messages than expected"
    return got


@dataclasses.dataclass
class Bridge:
    client: Client
    config: Config
    signer: SigningKey

    async def post(self, body: bytes) -> Any:
        return await self.client.post("/webhook", data=body, headers=self.signer.headers(body))

    async def wait_ready(self, seconds: float = 15.0) -> float:
        started = time.monotonic()
        while time.monotonic() - started < seconds:
            response = await self.client.get("/readyz")
            if response.status == 200 and (await response.json())["broker"] == "connected":
                return time.monotonic() - started
            await asyncio.sleep(0.1)
        raise AssertionError(f"not ready within {seconds}s")


@pytest.fixture
def make_bridge(
    aiohttp_client: Callable[[web.Application], Awaitable[Client]],
    amqp_url: str,
    signer: SigningKey,
    tmp_path: Path,
    forget_topology: list[BrokerConfig],
) -> Callable[..., Awaitable[Bridge]]:
    async def make(url: str | None = None, wait: bool = True) -> Bridge:
        config = make_config(key_base_url=key_folder(tmp_path, signer), amqp_url=url or amqp_url)
        forget_topology.append(config.broker)
        bridge = Bridge(await aiohttp_client(create_app(config)), config, signer)
        if wait:
            await bridge.wait_ready()
        return bridge

    return make


async def test_event_arrives_with_every_spec_property_and_header(
    make_bridge: Callable[..., Awaitable[Bridge]],
    consumer: aio_pika.abc.AbstractChannel,
) -> None:
    bridge = await make_bridge()
    queue = await bind_queue(consumer, bridge.config.broker.exchange, "lightroom-job-status.*")
    body = lightroom()
    headers = bridge.signer.headers(
        body,
        **{
            "x-adobe-provider": "di_event_code",
            "x-adobe-retry-count": "1",
            "traceparent": "00-aa-bb-01",
        },
    )
    before = datetime.now(UTC).replace(microsecond=0)
    response = await bridge.client.post("/webhook", data=body, headers=headers)
    assert response.status == 200
    (message,) = await take(queue, 1)
    assert message.routing_key == "lightroom-job-status.succeeded"
    assert message.body == body
    assert message.content_type == "application/json"
    assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert message.message_id == "7b59cc70-88d7-4895-b204-87f5350a0cce"
    assert message.type == "lightroom-job-status"
    assert message.app_id == "events-bridge"
    assert message.timestamp is not None
    assert message.timestamp >= before
    assert message.headers == {
        "event-code": "lightroom-job-status",
        "event-id": "7b59cc70-88d7-4895-b204-87f5350a0cce",
        "job-id": "eb4a9211-eb8a-4e88-b853-b9c08ba47427",
        "job-status": "succeeded",
        "ims-org-id": "<IMS org ID>",
        "registration": "default",
        "adobe-provider": "di_event_code",
        "adobe-delivery-id": headers["x-adobe-delivery-id"],
        "adobe-retry-count": "1",
        "traceparent": "00-aa-bb-01",
    }


async def test_batch_gives_one_message_per_event_and_topic_bindings_work(
    make_bridge: Callable[..., Awaitable[Bridge]],
    consumer: aio_pika.abc.AbstractChannel,
) -> None:
    bridge = await make_bridge()
    failed = await bind_queue(consumer, bridge.config.broker.exchange, "*.failed")
    everything = await bind_queue(consumer, bridge.config.broker.exchange, "#")
    body_failed = {**LIGHTROOM["event"]["body"], "outputs": [{"status": "failed"}]}
    events = [
        {**LIGHTROOM, "event_id": "b1", "recipientclientid": CLIENT_ID},
        {
            **LIGHTROOM,
            "event_id": "b2",
            "recipientclientid": CLIENT_ID,
            "event": {**LIGHTROOM["event"], "body": body_failed},
        },
    ]
    response = await bridge.post(orjson.dumps(events))
    assert response.status == 200
    (only_failed,) = await take(failed, 1)
    assert only_failed.message_id == "b2"
    assert only_failed.routing_key == "lightroom-job-status.failed"
    both = await take(everything, 2)
    assert sorted(m.message_id or "" for m in both) == ["b1", "b2"]


async def test_events_nobody_binds_for_are_parked_in_unrouted(
    make_bridge: Callable[..., Awaitable[Bridge]],
    consumer: aio_pika.abc.AbstractChannel,
) -> None:
    bridge = await make_bridge()
    response = await bridge.post(lightroom("parked-1"))
    assert response.status == 200
    queue = await consumer.get_queue(bridge.config.broker.unrouted_queue)
    (message,) = await take(queue, 1)
    assert message.message_id == "parked-1"
    await queue.delete(if_unused=False, if_empty=False)


def outbound(exchange: str, message_id: str = "m1") -> Outbound:
    return Outbound(
        exchange=exchange,
        routing_key="x.none",
        body=b"{}",
        message_id=message_id,
        type="x",
        timestamp=datetime.now(UTC),
        headers={"event-id": message_id},
    )


@pytest.fixture
async def publisher(amqp_url: str) -> AsyncIterator[AmqpPublisher]:
    config = make_config(amqp_url=amqp_url)
    publisher = AmqpPublisher(config.broker, config.topology)
    await publisher.start()
    assert await publisher.wait_ready(10)
    yield publisher
    await publisher.close()


async def test_a_returned_message_is_a_failure_not_a_success(
    publisher: AmqpPublisher,
    consumer: aio_pika.abc.AbstractChannel,
) -> None:
    name = f"test.noae.{time.monotonic_ns()}"
    exchange = await consumer.declare_exchange(name, aio_pika.ExchangeType.TOPIC, auto_delete=True)
    with pytest.raises(BrokerUnavailable) as caught:
        await publisher.publish([outbound(name)])
    assert caught.value.reason == "returned"
    await exchange.delete()


async def test_a_nack_is_a_failure(
    publisher: AmqpPublisher,
    consumer: aio_pika.abc.AbstractChannel,
) -> None:
    name = f"test.full.{time.monotonic_ns()}"
    _, queue = await fanout_queue(consumer, name, **FULL_AFTER_ONE)
    await publisher.publish([outbound(name, "first")])
    with pytest.raises(BrokerUnavailable) as caught:
        await publisher.publish([outbound(name, "second")])
    assert caught.value.reason == "nacked"
    (kept,) = await take(queue, 1)
    assert kept.message_id == "first"


async def test_same_message_id_in_flight_twice_is_serialized(
    publisher: AmqpPublisher,
    consumer: aio_pika.abc.AbstractChannel,
) -> None:
    name = f"test.dup.{time.monotonic_ns()}"
    _, queue = await fanout_queue(consumer, name)
    await asyncio.gather(*(publisher.publish([outbound(name, "same")]) for _ in range(5)))
    assert len(await take(queue, 5)) == 5


async def test_deleted_exchange_gives_503_then_the_bridge_heals_itself(
    make_bridge: Callable[..., Awaitable[Bridge]],
    consumer: aio_pika.abc.AbstractChannel,
) -> None:
    bridge = await make_bridge()
    await consumer.exchange_delete(bridge.config.broker.exchange)
    first = await bridge.post(lightroom("after-delete"))
    assert first.status in (200, 503)  # 200 only if the bridge already redeclared it
    await bridge.wait_ready()
    queue = await bind_queue(consumer, bridge.config.broker.exchange)
    deadline = time.monotonic() + 10
    while (await bridge.post(lightroom("healed"))).status != 200:
        assert time.monotonic() < deadline, "the bridge did not heal within 10 s"
        await asyncio.sleep(0.2)
    messages = await take(queue, 1)
    assert messages[0].message_id == "healed"


async def test_deleted_unrouted_queue_is_declared_again(
    make_bridge: Callable[..., Awaitable[Bridge]],
    consumer: aio_pika.abc.AbstractChannel,
) -> None:
    bridge = await make_bridge()
    await consumer.queue_delete(bridge.config.broker.unrouted_queue)
    response = await bridge.post(lightroom("parked-after-delete"))
    assert response.status == 503  # returned: nothing could take it
    deadline = time.monotonic() + 10
    while (await bridge.post(lightroom("parked-after-heal"))).status != 200:
        assert time.monotonic() < deadline, "the unrouted queue was not declared again"
        await asyncio.sleep(0.2)
    queue = await consumer.get_queue(bridge.config.broker.unrouted_queue)
    (message,) = await take(queue, 1)
    assert message.message_id == "parked-after-heal"


@pytest.fixture
async def proxy(amqp_url: str) -> AsyncIterator[Proxy]:
    url = URL(amqp_url)
    proxy = Proxy(url.host or "127.0.0.1", url.port or 5672)
    await proxy.start()
    yield proxy
    await proxy.stop()


def via(amqp_url: str, proxy: Proxy) -> str:
    return str(URL(amqp_url).with_host("127.0.0.1").with_port(proxy.port))


async def test_broker_outage_gives_fast_503s_then_recovers_without_restart(
    make_bridge: Callable[..., Awaitable[Bridge]],
    consumer: aio_pika.abc.AbstractChannel,
    proxy: Proxy,
    amqp_url: str,
) -> None:
    bridge = await make_bridge(via(amqp_url, proxy))
    queue = await bind_queue(consumer, bridge.config.broker.exchange)
    assert (await bridge.post(lightroom("before"))).status == 200
    proxy.down()
    slowest = 0.0
    for i in range(5):
        started = time.monotonic()
        response = await bridge.post(lightroom(f"during-{i}"))
        slowest = max(slowest, time.monotonic() - started)
        assert response.status == 503
        assert "Retry-After" in response.headers
        await asyncio.sleep(0.2)
    assert slowest < 8.0
    assert (await bridge.client.get("/readyz")).status == 503
    assert (await bridge.client.get("/healthz")).status == 200
    proxy.up()
    back = time.monotonic()
    while (await bridge.post(lightroom("after"))).status != 200:
        assert time.monotonic() - back < 10.0, "not publishing 10 s after the broker returned"
        await asyncio.sleep(0.1)
    ids = [m.message_id for m in await take(queue, 2)]
    assert ids == ["before", "after"]  # nothing answered 503 was published


async def test_broker_down_at_start_does_not_stop_the_daemon(
    make_bridge: Callable[..., Awaitable[Bridge]],
    proxy: Proxy,
    amqp_url: str,
) -> None:
    proxy.down()
    bridge = await make_bridge(via(amqp_url, proxy), wait=False)
    await asyncio.sleep(1.0)
    assert (await bridge.client.get("/readyz")).status == 503
    response = await bridge.post(lightroom())
    assert response.status == 503
    proxy.up()
    assert await bridge.wait_ready(10.0) < 10.0
    assert (await bridge.post(lightroom())).status == 200


async def test_memory_alarm_blocks_publishers_and_answers_still_come_in_time(
    make_bridge: Callable[..., Awaitable[Bridge]], broker_node: BrokerNode
) -> None:
    bridge = await make_bridge()
    await asyncio.to_thread(broker_node.ctl, "set_vm_memory_high_watermark", "0")
    try:
        started = time.monotonic()
        response = await bridge.post(lightroom("during-alarm"))
        elapsed = time.monotonic() - started
        assert response.status == 503
        assert (await response.json())["error"] in ("timeout", "deadline")
        assert elapsed < 8.0
    finally:
        await asyncio.to_thread(broker_node.ctl, "set_vm_memory_high_watermark", "0.4")
    deadline = time.monotonic() + 15
    while (await bridge.post(lightroom("after-alarm"))).status != 200:
        assert time.monotonic() < deadline, "not publishing after the alarm cleared"
        await asyncio.sleep(0.2)


async def test_real_broker_stop_and_start(
    make_bridge: Callable[..., Awaitable[Bridge]],
    consumer: aio_pika.abc.AbstractChannel,
    amqp_url: str,
    broker_node: BrokerNode,
) -> None:
    bridge = await make_bridge()
    assert (await bridge.post(lightroom("before-stop"))).status == 200
    await asyncio.to_thread(broker_node.ctl, "stop_app")
    try:
        started = time.monotonic()
        response = await bridge.post(lightroom("while-stopped"))
        assert response.status == 503
        assert time.monotonic() - started < 8.0
    finally:
        await asyncio.to_thread(broker_node.ctl, "start_app")
    back = time.monotonic()
    while (await bridge.post(lightroom("after-start"))).status != 200:
        assert time.monotonic() - back < 10.0, "not publishing 10 s after the broker returned"
        await asyncio.sleep(0.1)
    # The consumer fixture's connection died with the broker; check with a fresh one.
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.get_queue(bridge.config.broker.unrouted_queue)
        ids = [m.message_id for m in await take(queue, 2)]
        assert ids == ["before-stop", "after-start"]
        await queue.delete(if_unused=False, if_empty=False)


@pytest.mark.parametrize("name", sorted(SAMPLE_TABLE))
async def test_every_adobe_sample_is_published_as_its_index_says(
    name: str,
    make_bridge: Callable[..., Awaitable[Bridge]],
    consumer: aio_pika.abc.AbstractChannel,
) -> None:
    """Each events/ sample, given our recipient as Adobe would, signed, with the derived
    x-adobe-event-id/-code headers of events/INDEX.md for single deliveries."""
    bridge = await make_bridge()
    queue = await bind_queue(consumer, bridge.config.broker.exchange)
    doc = orjson.loads((EVENTS / name).read_bytes())
    items = doc if isinstance(doc, list) else [doc]
    stamped = [
        {**item, "recipientclientid": CLIENT_ID, "recipient_client_id": CLIENT_ID} for item in items
    ]
    body = orjson.dumps(stamped if isinstance(doc, list) else stamped[0])
    extra = (
        {} if isinstance(doc, list) else {"x-adobe-event-id": H_ID, "x-adobe-event-code": H_CODE}
    )
    response = await bridge.client.post(
        "/webhook", data=body, headers=bridge.signer.headers(body, **extra)
    )
    assert response.status == 200, await response.text()
    expected = SAMPLE_TABLE[name]
    messages = await take(queue, len(expected))
    for message, (code, event_id, job, status) in zip(messages, expected, strict=True):
        assert message.type == code
        assert (message.message_id or "").startswith(event_id)
        assert message.routing_key == f"{code}.{status or 'none'}"
        assert message.headers.get("job-id") == job
        assert message.headers.get("job-status") == status


async def test_outbox_keeps_events_through_an_outage_and_replays_them(
    aiohttp_client: Callable[[web.Application], Awaitable[Client]],
    consumer: aio_pika.abc.AbstractChannel,
    proxy: Proxy,
    amqp_url: str,
    signer: SigningKey,
    tmp_path: Path,
    forget_topology: list[BrokerConfig],
) -> None:
    from bridge.config import OutboxConfig

    config = make_config(key_base_url=key_folder(tmp_path, signer), amqp_url=via(amqp_url, proxy))
    config = dataclasses.replace(config, outbox=OutboxConfig(dir=str(tmp_path / "outbox")))
    forget_topology.append(config.broker)
    bridge = Bridge(await aiohttp_client(create_app(config)), config, signer)
    await bridge.wait_ready()
    queue = await bind_queue(consumer, config.broker.exchange)
    proxy.down()
    slowest = 0.0
    for i in range(20):
        started = time.monotonic()
        response = await bridge.post(lightroom(f"kept-{i}"))
        slowest = max(slowest, time.monotonic() - started)
        assert response.status == 200
        assert (await response.json())["status"] == "stored"
    assert slowest < 8.0
    ready = await bridge.client.get("/readyz")
    assert ready.status == 200  # not the broker, but the outbox can take events
    assert (await ready.json())["outbox_depth"] == 20
    proxy.up()
    messages = await take(queue, 20, seconds=20)
    assert sorted(m.message_id or "" for m in messages) == sorted(f"kept-{i}" for i in range(20))
    assert all(m.body == lightroom(m.message_id or "") for m in messages)


async def test_a_reload_is_refused_while_the_broker_is_away() -> None:
    from bridge.declare import TopologyMissing
    from bridge.topology import default_topology

    config = make_config(amqp_url="amqp://guest:guest@127.0.0.1:1/")
    publisher = AmqpPublisher(config.broker, config.topology)
    await publisher.apply_topology(config.topology)  # unchanged: nothing to do
    with pytest.raises(TopologyMissing, match="not connected"):
        await publisher.apply_topology(default_topology("x", "y", "z"))


async def test_only_the_broker_and_the_link_are_broker_errors() -> None:
    from bridge.link import broker_error

    assert broker_error(ConnectionResetError(104, "reset"))
    assert broker_error(aiormq.exceptions.ChannelClosed(None, "closed"))
    assert broker_error(StopAsyncIteration())
    # aio-pika's own RuntimeError about a connection that is not open
    with pytest.raises(RuntimeError) as theirs:
        await aio_pika.Connection(URL("amqp://guest:guest@127.0.0.1:1/")).channel()
    assert broker_error(theirs.value)
    with pytest.raises(RuntimeError) as ours:
        raise RuntimeError("a bug of ours")
    assert not broker_error(ours.value)
    assert not broker_error(AttributeError("'Channel' object has no attribute 'x'"))
    assert not broker_error(KeyError("x"))
