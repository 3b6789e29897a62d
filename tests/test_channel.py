"""bridge.channel on a real RabbitMQ: each aiormq internal the fast path relies on is pinned, and
the portable path (aiormq's public basic_publish) is taken, with one warning, when one differs.

``make test-portable`` runs every other suite on the portable path too (BRIDGE_PUBLISH_PATH).
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.metadata
import inspect
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import aio_pika
import aio_pika.abc
import aiormq
import aiormq.abc
import aiormq.channel
import pytest
from structlog.testing import capture_logs

from bridge import channel as wire
from bridge.errors import BrokerUnavailable
from bridge.message import Outbound
from bridge.publisher import AmqpPublisher, PublishFailed
from tests.helpers import FULL_AFTER_ONE, fanout_queue, make_config


@pytest.fixture
async def underlay(amqp_url: str) -> AsyncIterator[aiormq.Channel]:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        found = await channel.get_underlay_channel()
        assert isinstance(found, aiormq.Channel)
        yield found


@pytest.fixture
async def consumer(amqp_url: str) -> AsyncIterator[aio_pika.abc.AbstractChannel]:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        yield await connection.channel()


def test_the_aiormq_in_use_is_the_one_pyproject_declares() -> None:
    major, minor = (int(n) for n in importlib.metadata.version("aiormq").split(".")[:2])
    assert (major, minor) == (7, 2), "a new aiormq: check bridge.channel's internals, then widen"


async def test_each_internal_the_fast_path_relies_on(underlay: aiormq.Channel) -> None:
    assert type(underlay.delivery_tag) is int
    assert isinstance(underlay.confirmations, OrderedDict)
    assert type(underlay.message_id_delivery_tag) is dict
    assert underlay.write_queue is underlay.connection.write_queue
    assert isinstance(underlay.write_queue, asyncio.Queue)
    assert type(underlay.number) is int
    assert type(underlay.max_content_size) is int
    assert underlay.max_content_size == underlay.connection.connection_tune.frame_max - 8
    settle = inspect.signature(aiormq.Channel._confirm_delivery)
    assert list(settle.parameters) == ["self", "delivery_tag", "frame"]
    assert inspect.iscoroutinefunction(aiormq.Channel._on_confirm_frame)
    assert list(inspect.signature(aiormq.Channel._on_confirm_frame).parameters) == [
        "self",
        "frame",
    ]
    assert issubclass(aiormq.channel.Returning, asyncio.Future)
    frame = aiormq.abc.ChannelFrame(payload=b"x", should_close=False)
    assert (frame.payload, frame.should_close, frame.drain_future) == (b"x", False, None)
    assert wire.internals_problem(underlay) is None


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("delivery_tag", "0"),
        ("confirmations", {}),
        ("message_id_delivery_tag", None),
        ("write_queue", []),
        ("max_content_size", None),
    ],
)
async def test_an_internal_that_differs_is_named(
    underlay: aiormq.Channel, monkeypatch: pytest.MonkeyPatch, name: str, value: object
) -> None:
    monkeypatch.setattr(underlay, name, value)
    problem = wire.internals_problem(underlay)
    assert problem is not None
    assert name in problem


async def test_a_changed_method_or_frame_is_named(
    underlay: aiormq.Channel, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(underlay, "_confirm_delivery", lambda tag: None)
    assert "_confirm_delivery" in (wire.internals_problem(underlay) or "")
    monkeypatch.undo()

    @dataclasses.dataclass
    class OtherFrame:  # as a newer aiormq might have it
        data: bytes

    monkeypatch.setattr(aiormq.abc, "ChannelFrame", OtherFrame)
    assert "ChannelFrame" in (wire.internals_problem(underlay) or "")


def message(exchange: str, message_id: str = "m1") -> Outbound:
    return Outbound(
        exchange=exchange,
        routing_key="x.none",
        body=b'{"n": 1}',
        message_id=message_id,
        type="com.example.test",
        timestamp=datetime.now(UTC).replace(microsecond=0),
        headers={"event-id": message_id, "registration": "default"},
    )


async def published_on(
    amqp_url: str, consumer: aio_pika.abc.AbstractChannel
) -> tuple[str | None, aio_pika.abc.AbstractIncomingMessage]:
    """Publish one message with a fresh publisher; the path it took and what a consumer got."""
    name = f"test.path.{time.monotonic_ns()}"
    exchange, queue = await fanout_queue(consumer, name)
    config = make_config(amqp_url=amqp_url)
    publisher = AmqpPublisher(config.broker, config.topology)
    await publisher.start()
    try:
        assert await publisher.wait_ready(10)
        await publisher.publish([message(name)])
        path = publisher.path
    finally:
        await publisher.close()
    got = await queue.get(timeout=5, no_ack=True)
    await exchange.delete()
    return path, got


async def test_an_unexpected_aiormq_takes_the_portable_path_with_one_warning(
    amqp_url: str, consumer: aio_pika.abc.AbstractChannel, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(wire.PATH_VARIABLE, raising=False)
    fast_path, fast = await published_on(amqp_url, consumer)
    assert fast_path == wire.FAST

    @dataclasses.dataclass
    class OtherFrame:
        data: bytes

    monkeypatch.setattr(aiormq.abc, "ChannelFrame", OtherFrame)
    monkeypatch.setattr(wire, "_warned", False)
    with capture_logs() as logs:
        first_path, portable = await published_on(amqp_url, consumer)
        second_path, _ = await published_on(amqp_url, consumer)  # a reconnect: no new warning
    assert (first_path, second_path) == (wire.PORTABLE, wire.PORTABLE)
    warnings = [e for e in logs if e["event"] == "publish_path_portable"]
    assert len(warnings) == 1
    assert "ChannelFrame" in warnings[0]["reason"]
    # The same message on the wire, whichever path wrote it.
    for got in (fast, portable):
        assert got.body == b'{"n": 1}'
        assert got.message_id == "m1"
        assert got.type == "com.example.test"
        assert got.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
        assert got.content_type == "application/json"
        assert got.app_id == "events-bridge"
        assert got.headers == {"event-id": "m1", "registration": "default"}
    assert fast.timestamp is not None
    assert portable.timestamp is not None
    assert abs((fast.timestamp - portable.timestamp).total_seconds()) < 5


@pytest.fixture
async def portable(amqp_url: str, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[AmqpPublisher]:
    monkeypatch.setenv(wire.PATH_VARIABLE, "portable")
    config = make_config(amqp_url=amqp_url)
    publisher = AmqpPublisher(config.broker, config.topology)
    await publisher.start()
    assert await publisher.wait_ready(10)
    assert publisher.path == wire.PORTABLE
    yield publisher
    await publisher.close()


async def test_the_portable_path_says_returned_and_nacked(
    portable: AmqpPublisher, consumer: aio_pika.abc.AbstractChannel
) -> None:
    name = f"test.portable.{time.monotonic_ns()}"
    exchange = await consumer.declare_exchange(name, aio_pika.ExchangeType.FANOUT, auto_delete=True)
    with pytest.raises(BrokerUnavailable) as caught:  # bound to nothing, no alternate exchange
        await portable.publish([message(name)])
    assert caught.value.reason == "returned"
    await exchange.delete()
    exchange, _ = await fanout_queue(consumer, name, **FULL_AFTER_ONE)
    await portable.publish([message(name, "first")])
    with pytest.raises(BrokerUnavailable) as caught:
        await portable.publish([message(name, "second")])
    assert caught.value.reason == "nacked"
    await exchange.delete()


async def test_the_portable_path_fits_large_headers_as_the_fast_path_does(
    portable: AmqpPublisher, consumer: aio_pika.abc.AbstractChannel
) -> None:
    name = f"test.portable.{time.monotonic_ns()}"
    exchange, queue = await fanout_queue(consumer, name)
    huge = dataclasses.replace(message(name), headers={"event-id": "m1", "job-id": "j" * 200_000})
    await portable.publish([huge])
    got = await queue.get(timeout=5, no_ack=True)
    assert got.headers == {"event-id": "m1", "bridge-omitted": "job-id"}
    await exchange.delete()


async def test_internals_that_behave_otherwise_are_caught(
    underlay: aiormq.Channel, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(underlay, "_confirm_delivery", lambda tag, frame: None)  # pops nothing
    assert "settles confirms otherwise" in (wire.internals_problem(underlay) or "")
    monkeypatch.undo()
    assert underlay.confirmations == {}  # the probe left nothing behind

    @dataclasses.dataclass
    class FrameWithMore:  # a newer aiormq with one more required field
        payload: bytes
        should_close: bool
        priority: int

    monkeypatch.setattr(aiormq.abc, "ChannelFrame", FrameWithMore)
    assert "ChannelFrame" in (wire.internals_problem(underlay) or "")
    monkeypatch.undo()

    def unreadable(_: object) -> str:
        raise OSError("source not available")

    monkeypatch.setattr(inspect, "getsource", unreadable)  # the check itself fails: portable
    assert "check of aiormq's internals failed" in (wire.internals_problem(underlay) or "")


async def test_the_portable_path_hands_back_the_message_it_was_given(
    portable: AmqpPublisher, consumer: aio_pika.abc.AbstractChannel
) -> None:
    """Callers (the outbox) pair what failed with what they sent by identity, fitted or not."""
    name = f"test.portable.{time.monotonic_ns()}"
    exchange, _ = await fanout_queue(consumer, name, **FULL_AFTER_ONE)
    await portable.publish([message(name, "first")])
    huge = dataclasses.replace(
        message(name, "second"), headers={"event-id": "second", "job-id": "j" * 200_000}
    )
    with pytest.raises(PublishFailed) as caught:  # nacked: the queue is full
        await portable.publish([huge])
    assert [m for m, _ in caught.value.unsafe] == [huge]
    assert caught.value.unsafe[0][0] is huge
    await exchange.delete()
