"""A cluster's nodes as the link sees them (SPEC §9), on the real broker: each "node" is a proxy
of its own in front of it, so one can refuse, close, or fall silent while the others answer."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest
import structlog
from prometheus_client import generate_latest

from bridge import metrics
from bridge.message import Outbound
from bridge.nodes import PROBE_INTERVAL, PROBE_TIMEOUT
from bridge.publisher import AmqpPublisher
from tests.helpers import make_config
from tests.proxy import Proxy


@pytest.fixture
async def nodes(amqp_url: str) -> AsyncIterator[list[Proxy]]:
    host, port = amqp_url.split("@")[1].split("/", maxsplit=1)[0].rsplit(":", 1)
    proxies = [Proxy(host, int(port)) for _ in range(3)]
    for proxy in proxies:
        await proxy.start()
    yield proxies
    for proxy in proxies:
        await proxy.stop()


def url(proxy: Proxy) -> str:
    return f"amqp://guest:guest@127.0.0.1:{proxy.port}/"


@pytest.fixture
async def publisher_for(
    amqp_url: str,
) -> AsyncIterator[Any]:
    made: list[AmqpPublisher] = []

    async def make(*urls: str) -> AmqpPublisher:
        config = make_config(amqp_url=",".join(urls))
        publisher = AmqpPublisher(config.broker, config.topology)
        made.append(publisher)
        await publisher.start()
        assert await publisher.wait_ready(10), "never connected"
        return publisher

    yield make
    for publisher in made:
        await publisher.close()


def message(exchange: str, n: int) -> Outbound:
    return Outbound(
        exchange=exchange,
        routing_key="x.none",
        body=b"{}",
        message_id=f"m{n}",
        type="x",
        timestamp=datetime.now(UTC),
        headers={"event-id": f"m{n}"},
    )


async def on_node(publisher: AmqpPublisher, name: str, seconds: float) -> float:
    """Seconds until ``publisher`` is connected to the node ``name`` (fails after ``seconds``)."""
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        if publisher.ready and publisher.node is not None and publisher.node.name == name:
            return time.monotonic() - started
        await asyncio.sleep(0.05)
    current = publisher.node.name if publisher.node else None
    raise AssertionError(f"not on {name} after {seconds} s (on {current})")


def node_name(proxy: Proxy) -> str:
    return f"127.0.0.1:{proxy.port}"


async def test_the_first_node_that_answers_is_used(nodes: list[Proxy], publisher_for: Any) -> None:
    nodes[0].down()  # refuses: the next one is used, in order
    publisher = await publisher_for(url(nodes[0]), url(nodes[1]), url(nodes[2]))
    await on_node(publisher, node_name(nodes[1]), 5)
    await publisher.publish([message(publisher._config.exchange, 1)])  # noqa: SLF001


async def test_a_node_that_closes_is_left_for_the_next(
    nodes: list[Proxy], publisher_for: Any
) -> None:
    publisher = await publisher_for(url(nodes[0]), url(nodes[1]), url(nodes[2]))
    await on_node(publisher, node_name(nodes[0]), 5)
    nodes[0].down()
    nodes[0].up()  # back at once, as a restarted node: the next node is still tried first
    took = await on_node(publisher, node_name(nodes[1]), 5)
    assert took < 2.0, took
    await publisher.publish([message(publisher._config.exchange, 2)])  # noqa: SLF001


async def test_a_silent_node_is_left_within_seconds(nodes: list[Proxy], publisher_for: Any) -> None:
    """Cut off (no reset, nothing answers): the watchdog notices long before the heartbeat."""
    publisher = await publisher_for(url(nodes[0]), url(nodes[1]))
    await on_node(publisher, node_name(nodes[0]), 5)
    nodes[0].blackhole = True
    took = await on_node(publisher, node_name(nodes[1]), PROBE_INTERVAL + PROBE_TIMEOUT + 4)
    assert took <= PROBE_INTERVAL + PROBE_TIMEOUT + 2, took
    await publisher.publish([message(publisher._config.exchange, 3)])  # noqa: SLF001


async def test_every_node_down_then_one_back(nodes: list[Proxy], publisher_for: Any) -> None:
    publisher = await publisher_for(url(nodes[0]), url(nodes[1]))
    for proxy in nodes[:2]:
        proxy.down()
    await asyncio.sleep(1.5)
    assert not publisher.ready
    assert publisher.node is None
    assert publisher.problem is not None
    assert "AMQPConnectionError" in publisher.problem
    nodes[1].up()
    await on_node(publisher, node_name(nodes[1]), 8)
    assert publisher.problem is None


async def test_no_password_in_logs_or_metrics(nodes: list[Proxy], publisher_for: Any) -> None:
    nodes[0].down()
    with structlog.testing.capture_logs() as logs:
        publisher = await publisher_for(url(nodes[0]), url(nodes[1]), url(nodes[2]))
        await on_node(publisher, node_name(nodes[1]), 5)
        nodes[1].down()
        await on_node(publisher, node_name(nodes[2]), 5)
    text = repr(logs) + generate_latest(metrics.registry()).decode()
    assert "guest:guest" not in text  # the password of every URL, whichever was in use
    assert "guest:***@" in repr(logs)
    assert f'bridge_broker_node_info{{node="{node_name(nodes[2])}"}} 1.0' in text
    assert f'bridge_broker_node_info{{node="{node_name(nodes[1])}"}} 0.0' in text
