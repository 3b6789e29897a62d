"""Three independent consumers, 1,000 simulated events: each gets exactly what it binds for."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aio_pika
import orjson
from aiohttp import web
from aiohttp.test_utils import TestServer

from bridge.app import create_app
from bridge.config import BrokerConfig
from bridge.simulate import Simulator, build_deliveries
from tests.helpers import CLIENT_ID, KEY_PATH, SigningKey, key_folder, make_config

CODES = ("lightroom-job-status", "photoshop-job-status")
STATUSES = ("succeeded", "failed", "running")


def make_event(i: int) -> tuple[str, str, Any]:
    """Event i: alternating codes, statuses and envelopes (legacy adobe_io, CloudEvents)."""
    code, status = CODES[i % 2], STATUSES[i % 3]
    body = {"jobId": f"job-{i}", "outputs": [{"status": status, "input": f"in-{i}"}]}
    event_id = f"evt-{i:04d}"
    if i % 4 < 2:
        doc: dict[str, Any] = {
            "event_id": event_id,
            "event": {"header": {"eventCode": code, "imsOrgId": "ORG@AdobeOrg"}, "body": body},
        }
    else:
        doc = {
            "specversion": "1.0",
            "type": code,
            "id": f"ce-{i}",
            "source": "urn:test",
            "eventid": event_id,
            "data": body,
        }
    return event_id, f"{code}.{status}", doc


async def test_three_consumers_get_exactly_their_events(
    aiohttp_server: Callable[[web.Application], Awaitable[TestServer]],
    amqp_url: str,
    tmp_path: Path,
    forget_topology: list[BrokerConfig],
) -> None:
    signer = SigningKey.generate()
    config = make_config(key_base_url=key_folder(tmp_path, signer), amqp_url=amqp_url)
    forget_topology.append(config.broker)
    server = await aiohttp_server(create_app(config))
    url = str(server.make_url("/webhook"))
    async with aiohttp_session() as session:
        deadline = time.monotonic() + 15
        while (await session.get(str(server.make_url("/readyz")))).status != 200:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)

    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=500)
        bindings = {
            "failed-lightroom": "lightroom-job-status.failed",
            "succeeded": "*.succeeded",
            "all": "#",
        }
        queues = {}
        for name, key in bindings.items():
            queue = await channel.declare_queue(exclusive=True)
            await queue.bind(config.broker.exchange, routing_key=key)
            queues[name] = queue

        events = [make_event(i) for i in range(1000)]
        raw = [(orjson.dumps(doc), doc) for _, _, doc in events]
        deliveries = build_deliveries(raw[:500], 0, CLIENT_ID) + build_deliveries(
            raw[500:], 20, CLIENT_ID
        )
        simulator = Simulator(
            url=url, keys=[signer.private], key_paths=[KEY_PATH], concurrency=16, quiet=True
        )
        await simulator.run(deliveries)
        assert all(d.accepted for d in deliveries)
        assert len(deliveries) == 500 + 25

        expected = {
            "failed-lightroom": {i for i, key, _ in events if key == "lightroom-job-status.failed"},
            "succeeded": {i for i, key, _ in events if key.endswith(".succeeded")},
            "all": {i for i, _, _ in events},
        }
        for name, queue in queues.items():
            got: list[str] = []
            deadline = time.monotonic() + 20
            while len(got) < len(expected[name]) and time.monotonic() < deadline:
                message = await queue.get(fail=False, no_ack=True)
                if message is None:
                    await asyncio.sleep(0.05)
                    continue
                got.append(message.message_id or "")
            await asyncio.sleep(0.2)
            assert await queue.get(fail=False, no_ack=True) is None, f"{name}: more than expected"
            assert len(got) == len(set(got)), f"{name}: duplicates"
            assert set(got) == expected[name], name
        assert len(expected["failed-lightroom"]) == 166
        assert len(expected["succeeded"]) == 334


def aiohttp_session() -> Any:
    import aiohttp

    return aiohttp.ClientSession()
