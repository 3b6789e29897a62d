"""SIGHUP while traffic flows: a broken file keeps the old routes, a good one applies the new."""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import orjson

from bridge.config import BrokerConfig
from tests.helpers import CLIENT_ID, EVENTS, SigningKey, key_folder
from tests.processes import Daemon, free_port

LIGHTROOM = orjson.loads((EVENTS / "imaging_lightroom-job-status_succeeded.json").read_bytes())


def config_text(p: str, with_alerts: bool) -> str:
    alerts_topology = (
        f"""
    - {{name: {p}.alerts, type: fanout}}
  queues:
    - {{name: {p}.alerts, type: quorum}}"""
        if with_alerts
        else "\n  queues:"
    )
    alerts_binding = f"\n    - {{exchange: {p}.alerts, queue: {p}.alerts}}" if with_alerts else ""
    alerts_rule = (
        f"""
  - name: alert-on-failure
    match: {{status: failed}}
    continue: true
    targets: [{{exchange: {p}.alerts, routing_key: "{{job_id}}"}}]"""
        if with_alerts
        else ""
    )
    return f"""
broker:
  url: ${{BRIDGE_AMQP_URL}}
  exchange: {p}.events
  unrouted_exchange: {p}.unrouted
  unrouted_queue: {p}.unrouted
server:
  port: ${{BRIDGE_PORT}}
verification:
  key_base_url: ${{BRIDGE_KEY_BASE_URL}}
registrations:
  - {{name: default, path: /webhook, client_ids: [{CLIENT_ID}]}}
logging:
  format: json
outbox:
  dir: ${{BRIDGE_OUTBOX_DIR}}
topology:
  exchanges:
    - {{name: {p}.events, type: topic, alternate_exchange: {p}.unrouted}}
    - {{name: {p}.unrouted, type: fanout}}{alerts_topology}
    - {{name: {p}.unrouted}}
    - {{name: {p}.all, type: quorum}}
  bindings:
    - {{exchange: {p}.unrouted, queue: {p}.unrouted}}
    - {{exchange: {p}.events, queue: {p}.all, routing_key: "#"}}{alerts_binding}
routes:{alerts_rule}
  - name: default
    targets: [{{exchange: {p}.events}}]
"""


async def test_sighup_reloads_routes_under_traffic_and_loses_nothing(
    tmp_path: Path, amqp_url: str, forget_topology: list[BrokerConfig]
) -> None:
    prefix = f"reload.{uuid.uuid4().hex[:8]}"
    forget_topology.append(
        BrokerConfig(
            exchange=f"{prefix}.events",
            unrouted_exchange=f"{prefix}.unrouted",
            unrouted_queue=f"{prefix}.unrouted",
        )
    )
    signer = SigningKey.generate()
    config = tmp_path / "bridge.yaml"
    config.write_text(config_text(prefix, with_alerts=False))
    env = {
        "BRIDGE_AMQP_URL": amqp_url,
        "BRIDGE_PORT": str(free_port()),
        "BRIDGE_KEY_BASE_URL": key_folder(tmp_path / "keys", signer),
    }
    daemon = Daemon(config, env)
    answered: dict[str, int] = {}
    failed_ids: list[str] = []
    stop = asyncio.Event()

    async def traffic() -> None:
        async with aiohttp.ClientSession() as session:
            n = 0
            while not stop.is_set() and n < 5000:
                event_id = f"r{n:05d}"
                status = "failed" if n % 2 else "succeeded"
                body_doc: dict[str, Any] = {
                    **LIGHTROOM,
                    "event_id": event_id,
                    "recipientclientid": CLIENT_ID,
                }
                body_doc["event"] = {
                    **LIGHTROOM["event"],
                    "body": {"jobId": f"job-{n}", "outputs": [{"status": status}]},
                }
                body = orjson.dumps(body_doc)
                async with session.post(
                    daemon.url + "/webhook", data=body, headers=signer.headers(body)
                ) as response:
                    answered[event_id] = response.status
                if status == "failed":
                    failed_ids.append(event_id)
                n += 1

    try:
        await asyncio.to_thread(daemon.wait_ready)
        sender = asyncio.create_task(traffic())
        await asyncio.sleep(0.5)
        config.write_text("routes: [this is: not valid\n")
        daemon.process.send_signal(signal.SIGHUP)
        failed = await asyncio.to_thread(daemon.wait_log, "config_reload_failed")
        assert failed["problems"][0].startswith("(top): not valid YAML")
        await asyncio.sleep(0.5)
        before_reload = len(answered)
        config.write_text(config_text(prefix, with_alerts=True))
        daemon.process.send_signal(signal.SIGHUP)
        await asyncio.to_thread(daemon.wait_log, "config_reloaded")
        reloaded_at = len(answered)
        await asyncio.sleep(0.5)
        stop.set()
        await sender
        code, _ = await asyncio.to_thread(daemon.stop)
    finally:
        daemon.kill()
    assert code == 0
    assert set(answered.values()) == {200}, "every request answered 200, through both reloads"
    assert reloaded_at > before_reload > 0

    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        everything = await drain(await channel.get_queue(f"{prefix}.all"))
        alerts = await drain(await channel.get_queue(f"{prefix}.alerts"))
        await channel.queue_delete(f"{prefix}.all")
        await channel.queue_delete(f"{prefix}.alerts")
        await channel.exchange_delete(f"{prefix}.alerts")
    assert set(everything) == set(answered), "every event answered 200 is in the queue"
    assert alerts, "the new rule applied after the good reload"
    assert set(alerts) <= set(failed_ids)
    # Failed events sent well after the reload all raised an alert; none sent before it did.
    assert set(failed_ids[-20:]) <= set(alerts)
    assert not set(alerts) & set(failed_ids[: before_reload // 2 - 1])


async def drain(queue: aio_pika.abc.AbstractQueue) -> list[str]:
    ids: list[str] = []
    idle_since = time.monotonic()
    while time.monotonic() - idle_since < 1.0:
        message = await queue.get(fail=False, no_ack=True)
        if message is None:
            await asyncio.sleep(0.05)
            continue
        ids.append(message.message_id or "")
        idle_since = time.monotonic()
    return ids
