"""SIGKILL with events in the outbox: after a restart, every event answered 200 is delivered."""

from __future__ import annotations

import asyncio
import signal
import time
import urllib.request
from pathlib import Path

import aio_pika
import orjson

from bridge.config import BrokerConfig
from tests.helpers import CLIENT_ID, EVENTS, SigningKey, key_folder
from tests.processes import Daemon, free_port
from tests.test_cli import isolated_config

LIGHTROOM = orjson.loads((EVENTS / "imaging_lightroom-job-status_succeeded.json").read_bytes())


def post(url: str, signer: SigningKey, event_id: str) -> int:
    body = orjson.dumps({**LIGHTROOM, "event_id": event_id, "recipientclientid": CLIENT_ID})
    request = urllib.request.Request(
        url + "/webhook", data=body, method="POST", headers=signer.headers(body)
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        status: int = response.status
        return status


async def test_sigkill_with_a_backlog_then_restart_delivers_everything(
    tmp_path: Path,
    amqp_url: str,
    forget_topology: list[BrokerConfig],
) -> None:
    signer = SigningKey.generate()
    config = isolated_config(tmp_path, forget_topology)
    prefix = forget_topology[-1].exchange.removesuffix(".events")
    outbox = tmp_path / "outbox"
    env = {
        "BRIDGE_CLIENT_IDS": CLIENT_ID,
        "BRIDGE_KEY_BASE_URL": key_folder(tmp_path / "keys", signer),
        "BRIDGE_OUTBOX_DIR": str(outbox),
        "BRIDGE_LOG_FORMAT": "json",
        "BRIDGE_PORT": str(free_port()),
        # No broker: nothing listens there, so every event goes to the outbox.
        "BRIDGE_AMQP_URL": f"amqp://guest:guest@127.0.0.1:{free_port()}/",
    }
    down = Daemon(config, env)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(down.url + "/healthz", timeout=2):
                    break
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        statuses = [post(down.url, signer, f"k{i}") for i in range(30)]
        assert statuses == [200] * 30
        down.process.send_signal(signal.SIGKILL)
        down.process.wait(timeout=10)
    finally:
        down.kill()

    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        # The restarted bridge declares the topology; a queue bound now catches the replay.
        up = Daemon(config, {**env, "BRIDGE_AMQP_URL": amqp_url, "BRIDGE_PORT": str(free_port())})
        try:
            found = await asyncio.to_thread(up.wait_log, "outbox_backlog_found", 20)
            unrouted = await channel.get_queue(f"{prefix}.unrouted", ensure=False)
            drained = await asyncio.to_thread(up.wait_log, "outbox_drained", 20)
            ids: list[str] = []
            for _ in range(200):
                message = await unrouted.get(fail=False, no_ack=True)
                if message is None:
                    if len(ids) >= 30:
                        break
                    await asyncio.sleep(0.05)
                    continue
                ids.append(message.message_id or "")
            code, logs = await asyncio.to_thread(up.stop)
        finally:
            up.kill()
    assert code == 0
    assert sorted(set(ids)) == sorted(f"k{i}" for i in range(30))
    assert found["events"] == 30  # every event answered 200 was on disk after the SIGKILL
    assert drained["replayed"] == 30  # and the restart published each from there
    # The restart was no failure: no error in the log (and no traceback: Daemon.logs checks).
    assert [line["event"] for line in logs if line["level"] in ("error", "critical")] == []
