"""Topology from YAML on a real broker, and the consumer helper's retries and dead letters."""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aio_pika
import aio_pika.abc
import orjson
import pytest

from bridge.app import create_app
from bridge.config import BrokerConfig, Config, parse_config
from bridge.consumer import ATTEMPT_HEADER, Consumer, PermanentFailure, ReceivedEvent, decode
from bridge.declare import declare_topology
from tests.broker_node import broker_major
from tests.helpers import CLIENT_ID, EVENTS, SigningKey, key_folder
from tests.processes import Daemon, cli, free_port

LIGHTROOM = orjson.loads((EVENTS / "imaging_lightroom-job-status_succeeded.json").read_bytes())


def topology_yaml(p: str) -> str:
    return f"""
broker:
  url: ${{BRIDGE_AMQP_URL}}
  exchange: {p}.events
  unrouted_exchange: {p}.unrouted
  unrouted_queue: {p}.unrouted
verification:
  key_base_url: ${{BRIDGE_KEY_BASE_URL:-file:///nowhere}}
registrations:
  - {{name: default, path: /webhook, client_ids: [{CLIENT_ID}]}}
outbox:
  mode: "off"
topology:
  exchanges:
    - {{name: {p}.events, type: topic, alternate_exchange: {p}.unrouted}}
    - {{name: {p}.unrouted, type: fanout}}
    - {{name: {p}.dlx, type: fanout}}
  queues:
    - {{name: {p}.unrouted}}
    - {{name: {p}.jobs, type: quorum, dead_letter_exchange: {p}.dlx}}
    - {{name: {p}.jobs.dead, type: quorum}}
    - {{name: {p}.capped, type: classic, max_length: 1, overflow: reject-publish,
       message_ttl_ms: 60000}}
  bindings:
    - {{exchange: {p}.unrouted, queue: {p}.unrouted}}
    - {{exchange: {p}.events, queue: {p}.jobs, routing_key: "*.failed"}}
    - {{exchange: {p}.dlx, queue: {p}.jobs.dead}}
routes:
  - name: everything
    targets: [{{exchange: {p}.events}}]
"""


@pytest.fixture
def prefix(amqp_url: str) -> str:
    return f"topo.{uuid.uuid4().hex[:8]}"


@dataclasses.dataclass
class Declared:
    config: Config
    connection: aio_pika.abc.AbstractConnection
    channel: aio_pika.abc.AbstractChannel


@pytest.fixture
async def declared(
    amqp_url: str, prefix: str, forget_topology: list[BrokerConfig], tmp_path: Path
) -> AsyncIterator[Declared]:
    signer = SigningKey.generate()
    env = {"BRIDGE_AMQP_URL": amqp_url, "BRIDGE_KEY_BASE_URL": key_folder(tmp_path, signer)}
    config = parse_config(topology_yaml(prefix), "t.yaml", env)
    forget_topology.append(config.broker)
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        await declare_topology(channel, config.topology)
        yield Declared(config, connection, channel)
        for name in ("jobs", "jobs.dead", "jobs.retry", "capped"):
            await channel.queue_delete(f"{prefix}.{name}")
        await channel.exchange_delete(f"{prefix}.dlx")


async def test_queue_arguments_from_yaml_reach_the_broker(
    declared: Declared,
    prefix: str,
) -> None:
    channel = declared.channel
    exchange = await channel.get_exchange(f"{prefix}.events")
    # reject-publish with max_length 1: the second message is refused (a nack), so the
    # arguments were applied as written.
    queue = await channel.get_queue(f"{prefix}.capped")
    await queue.bind(exchange, "capped.#")
    confirming = await declared.connection.channel(publisher_confirms=True)
    target = await confirming.get_exchange(f"{prefix}.events")
    await target.publish(aio_pika.Message(b"1"), "capped.x")
    with pytest.raises(aio_pika.exceptions.DeliveryError):
        await target.publish(aio_pika.Message(b"2"), "capped.x")
    # Declaring again with different arguments is refused by the broker, never silently changed.
    with pytest.raises(aio_pika.exceptions.ChannelPreconditionFailed):
        await confirming.declare_queue(
            f"{prefix}.capped",
            durable=True,
            arguments={"x-queue-type": "classic", "x-max-length": 2},
        )


async def test_a_failing_consumer_lands_the_event_in_the_dead_letter_queue(
    declared: Declared,
    prefix: str,
    amqp_url: str,
    aiohttp_client: object,
    tmp_path: Path,
) -> None:
    channel = declared.channel
    signer = SigningKey.generate()
    config = parse_config(
        topology_yaml(prefix),
        "t.yaml",
        {"BRIDGE_AMQP_URL": amqp_url, "BRIDGE_KEY_BASE_URL": key_folder(tmp_path / "k", signer)},
    )
    client = await aiohttp_client(create_app(config))  # type: ignore[operator]
    deadline = time.monotonic() + 15
    while (await client.get("/readyz")).status != 200:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)
    failed_body = {
        **LIGHTROOM["event"]["body"],
        "outputs": [{"status": "failed", "errorDetails": "bad input"}],
    }
    body = orjson.dumps(
        {
            **LIGHTROOM,
            "recipientclientid": CLIENT_ID,
            "event": {**LIGHTROOM["event"], "body": failed_body},
        }
    )
    response = await client.post("/webhook", data=body, headers=signer.headers(body))
    assert response.status == 200

    seen: list[ReceivedEvent] = []

    async def always_fails(event: ReceivedEvent) -> None:
        seen.append(event)
        raise RuntimeError("downstream is broken")

    consumer = Consumer(
        amqp_url, f"{prefix}.jobs", always_fails, max_attempts=3, retry_delay=0.2, prefetch=4
    )
    await consumer.start()
    dead = await channel.get_queue(f"{prefix}.jobs.dead")
    message = None
    deadline = time.monotonic() + 15
    while message is None and time.monotonic() < deadline:
        message = await dead.get(fail=False, no_ack=True)
        await asyncio.sleep(0.05)
    await consumer.close()
    assert message is not None, "the event never reached the dead-letter queue"
    assert [e.attempt for e in seen] == [1, 2, 3]
    assert {e.routing_key for e in seen} == {"lightroom-job-status.failed"}  # kept across retries
    assert seen[0].job is not None
    assert seen[0].job.status == "failed"
    assert seen[0].job.job_id == "eb4a9211-eb8a-4e88-b853-b9c08ba47427"
    assert seen[0].job.outputs[0].errors == "bad input"
    assert message.message_id == "7b59cc70-88d7-4895-b204-87f5350a0cce"
    assert message.headers[ATTEMPT_HEADER] == 3
    deaths = message.headers["x-death"]
    assert isinstance(deaths, list)
    history = {(d["queue"], d["reason"]): d["count"] for d in deaths if isinstance(d, dict)}
    assert history[(f"{prefix}.jobs", "rejected")] == 1
    # Each retry is a copy the consumer publishes with the headers it got: RabbitMQ 3.x goes on
    # counting from the copy's x-death, 4.x ignores x-death from clients and starts again at 1.
    retries = 2 if broker_major(declared.connection) < 4 else 1
    assert history[(f"{prefix}.jobs.retry", "expired")] == retries
    assert consumer.counts == {"handled": 0, "retried": 2, "dead_lettered": 1, "duplicates": 0}
    assert decode(message).event_code == "lightroom-job-status"


async def test_consumer_acks_dedups_and_dead_letters_permanent_failures(
    declared: Declared,
    prefix: str,
    amqp_url: str,
) -> None:
    channel = declared.channel
    exchange = await channel.get_exchange(f"{prefix}.events")
    handled: list[str] = []

    async def handler(event: ReceivedEvent) -> None:
        if event.event_id == "poison":
            raise PermanentFailure("cannot ever work")
        handled.append(event.event_id)

    for event_id in ("a", "b", "a", "poison"):
        body = orjson.dumps({**LIGHTROOM, "event_id": event_id})
        await exchange.publish(
            aio_pika.Message(body, message_id=event_id, type="lightroom-job-status"), "x.failed"
        )
    consumer = Consumer(amqp_url, f"{prefix}.jobs", handler, retry_delay=0.1)
    await consumer.start()
    deadline = time.monotonic() + 10
    while sum(consumer.counts.values()) < 4 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    await consumer.close()
    assert handled == ["a", "b"]
    assert consumer.counts == {"handled": 2, "retried": 0, "dead_lettered": 1, "duplicates": 1}
    dead = await channel.get_queue(f"{prefix}.jobs.dead")
    poisoned = await dead.get(fail=False, no_ack=True)
    assert poisoned is not None
    assert poisoned.message_id == "poison"


def test_passive_topology_missing_on_the_broker_stops_serve_with_one_line(
    tmp_path: Path,
    amqp_url: str,
) -> None:
    config = tmp_path / "passive.yaml"
    config.write_text(
        "registrations:\n  - {name: d, client_ids: [c]}\n"
        "outbox:\n  dir: ${BRIDGE_OUTBOX_DIR}\n"
        "broker:\n  unrouted_exchange: no.such.unrouted\n"
        "topology:\n  passive: true\n  exchanges:\n    - {name: no.such.exchange}\n"
        "    - {name: no.such.unrouted}\n"
        "routes:\n  - {targets: [{exchange: no.such.exchange}]}\n"
    )
    env = {
        "BRIDGE_AMQP_URL": amqp_url,
        "BRIDGE_PORT": str(free_port()),
        "BRIDGE_LOG_FORMAT": "json",
    }
    daemon = Daemon(config, env)
    try:
        code = daemon.process.wait(timeout=30)
    finally:
        daemon.kill()
    assert code == 1
    lines = daemon.log_file.read_text().splitlines()
    assert lines[-1] == (
        "events-bridge: exchange 'no.such.exchange', exchange 'no.such.unrouted' missing on the "
        "broker (topology.passive)"
    )
    declared = cli("declare", "--config", str(config), env={"BRIDGE_AMQP_URL": amqp_url})
    assert declared.returncode == 1
    assert declared.stderr.strip() == (
        "events-bridge: exchange 'no.such.exchange', exchange 'no.such.unrouted' missing on the "
        "broker (topology.passive is true)"
    )


async def test_a_message_that_breaks_decoding_is_dead_lettered_not_stuck(
    declared: Declared,
    prefix: str,
    amqp_url: str,
) -> None:
    exchange = await declared.channel.get_exchange(f"{prefix}.events")
    body = b'{"event_id":"odd","event":{"body":{"status":"failed","outputs":5}}}'
    await exchange.publish(aio_pika.Message(body, message_id="odd"), "x.failed")

    async def never(_event: ReceivedEvent) -> None:
        raise AssertionError("must not be called")

    consumer = Consumer(amqp_url, f"{prefix}.jobs", never, retry_delay=0.1)
    await consumer.start()
    dead = await declared.channel.get_queue(f"{prefix}.jobs.dead")
    message = None
    deadline = time.monotonic() + 10
    while message is None and time.monotonic() < deadline:
        message = await dead.get(fail=False, no_ack=True)
        await asyncio.sleep(0.05)
    await consumer.close()
    assert message is not None
    assert message.message_id == "odd"
