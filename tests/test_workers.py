"""``serve --workers N``: processes sharing the port, each publishing; the parent passes on
signals, stops everything when one worker dies, and /metrics adds up all workers. Real broker."""

from __future__ import annotations

import asyncio
import datetime
import os
import re
import signal
import time
import urllib.request
from pathlib import Path

import aio_pika
import orjson

from bridge.config import BrokerConfig
from bridge.message import Outbound
from bridge.outbox import Outbox
from bridge.workers import WorkerSpec, stranded_outbox_dirs
from tests.helpers import EVENTS, FakePublisher, SigningKey
from tests.processes import Daemon, daemon_env
from tests.test_cli import isolated_config

# post: one request per connection, so the kernel picks a worker
from tests.test_outbox_durability import post

LIGHTROOM = orjson.loads((EVENTS / "imaging_lightroom-job-status_succeeded.json").read_bytes())


def two_workers(
    tmp_path: Path, amqp_url: str, forget_topology: list[BrokerConfig]
) -> tuple[Daemon, SigningKey]:
    signer = SigningKey.generate()
    config = isolated_config(tmp_path, forget_topology)
    return Daemon(config, daemon_env(tmp_path, signer, amqp_url), ("--workers", "2")), signer


def worker_pids(daemon: Daemon) -> list[int]:
    (started,) = [line for line in daemon.logs() if line["event"] == "workers_started"]
    pids: list[int] = started["pids"]
    return pids


def wait_for(daemon: Daemon, event: str, count: int, seconds: float = 20) -> list[int]:
    """Workers (by index) that logged ``event``, once ``count`` of them have."""
    deadline = time.monotonic() + seconds
    while True:
        found = sorted({line["worker"] for line in daemon.logs() if line["event"] == event})
        if len(found) >= count:
            return found
        assert daemon.process.poll() is None, daemon.log_file.read_text()
        assert time.monotonic() < deadline, f"{event}: only workers {found}"
        time.sleep(0.1)


async def drain(amqp_url: str, queue: str, expected: int) -> list[str]:
    connection = await aio_pika.connect(amqp_url)
    ids: list[str] = []
    async with connection:
        channel = await connection.channel()
        source = await channel.get_queue(queue, ensure=False)
        deadline = time.monotonic() + 20
        while len(ids) < expected and time.monotonic() < deadline:
            message = await source.get(fail=False, no_ack=True)
            if message is None:
                await asyncio.sleep(0.05)
                continue
            ids.append(message.message_id or "")
        await asyncio.sleep(0.3)  # nothing more should come
        while (message := await source.get(fail=False, no_ack=True)) is not None:
            ids.append(message.message_id or "")
    return ids


async def test_two_workers_share_the_port_publish_reload_and_stop_cleanly(
    tmp_path: Path, amqp_url: str, forget_topology: list[BrokerConfig]
) -> None:
    daemon, signer = two_workers(tmp_path, amqp_url, forget_topology)
    prefix = forget_topology[-1].exchange.removesuffix(".events")
    try:
        await asyncio.to_thread(wait_for, daemon, "broker_connected", 2)
        statuses = [await asyncio.to_thread(post, daemon.url, signer, f"w{i}") for i in range(40)]
        assert statuses == [200] * 40
        ids = await drain(amqp_url, f"{prefix}.unrouted", 40)
        assert sorted(ids) == sorted(f"w{i}" for i in range(40))
        # Both workers took requests: 40 connections spread by the kernel.
        handled = [line for line in daemon.logs() if line["event"] == "webhook_handled"]
        assert {line["worker"] for line in handled} == {0, 1}
        # /metrics, whichever worker answers, counts the requests of both.
        with urllib.request.urlopen(daemon.url + "/metrics", timeout=5) as response:
            text = response.read().decode()
        answered = sum(
            float(value)
            for value in re.findall(
                r'^bridge_requests_total\{[^}]*status="200"[^}]*\} (\S+)$', text, re.MULTILINE
            )
        )
        assert answered == 40
        # SIGHUP reaches every worker.
        daemon.process.send_signal(signal.SIGHUP)
        assert await asyncio.to_thread(wait_for, daemon, "config_reloaded", 2) == [0, 1]
        code, logs = await asyncio.to_thread(daemon.stop)
    finally:
        daemon.kill()
    assert code == 0
    assert sorted(line["worker"] for line in logs if line["event"] == "bridge_stopped") == [0, 1]
    assert any(line["event"] == "workers_stopped" for line in logs)


async def test_a_worker_that_dies_stops_the_others_and_the_parent_fails(
    tmp_path: Path, amqp_url: str, forget_topology: list[BrokerConfig]
) -> None:
    daemon, _ = two_workers(tmp_path, amqp_url, forget_topology)
    try:
        await asyncio.to_thread(wait_for, daemon, "broker_connected", 2)
        victim = worker_pids(daemon)[1]
        os.kill(victim, signal.SIGKILL)
        await asyncio.to_thread(daemon.process.wait, 30)
        logs = daemon.logs()
    finally:
        daemon.kill()
    assert daemon.process.returncode == 1
    exited = [line for line in logs if line["event"] == "worker_exited"]
    assert exited
    assert exited[0]["pid"] == victim
    assert exited[0]["exit_code"] == -signal.SIGKILL
    # The survivor stopped the clean way.
    assert [line["worker"] for line in logs if line["event"] == "bridge_stopped"] == [0]


def test_workers_flag_is_checked() -> None:
    from tests.processes import cli

    for bad in ("0", "65", "two"):
        result = cli("serve", "--workers", bad)
        assert result.returncode == 2
        assert "expected a whole number from 1 to 64" in result.stderr


def test_worker_outbox_folders() -> None:
    base = Path("/var/lib/bridge/outbox")
    assert WorkerSpec(0, 3).outbox_dir(base) == base
    assert WorkerSpec(2, 3).outbox_dir(base) == base / "worker-2"
    assert WorkerSpec.parse("1/4") == WorkerSpec(1, 4)


async def test_outbox_of_a_worker_that_no_longer_exists_is_replayed(
    tmp_path: Path, amqp_url: str, forget_topology: list[BrokerConfig]
) -> None:
    """A run with 4 workers left events in worker-3's folder; one worker now replays them."""
    signer = SigningKey.generate()
    config = isolated_config(tmp_path, forget_topology)
    prefix = forget_topology[-1].exchange.removesuffix(".events")
    env = daemon_env(tmp_path, signer, amqp_url)
    base = Path(env["BRIDGE_OUTBOX_DIR"])
    (base / "worker-1").mkdir(parents=True)  # a folder this run uses, or an empty one
    down = FakePublisher()  # a broker that is away, so the records stay in the folder
    down.ready, down.fail = False, True
    left = Outbox(base / "worker-3", 1 << 20, down)
    await left.open()
    await left.append(
        [
            Outbound(
                exchange=f"{prefix}.events",
                routing_key="lightroom-job-status.succeeded",
                body=orjson.dumps({**LIGHTROOM, "event_id": f"s{i}"}),
                message_id=f"s{i}",
                type="lightroom-job-status",
                timestamp=datetime.datetime.now(datetime.UTC),
                headers={"event-id": f"s{i}"},
            )
            for i in range(5)
        ]
    )
    await left.close()
    assert stranded_outbox_dirs(base, 1) == [base / "worker-1", base / "worker-3"]
    assert stranded_outbox_dirs(base, 4) == []
    daemon = Daemon(config, env)
    try:
        await asyncio.to_thread(daemon.wait_ready)
        ids = await drain(amqp_url, f"{prefix}.unrouted", 5)
        code, logs = await asyncio.to_thread(daemon.stop)
    finally:
        daemon.kill()
    assert code == 0
    assert sorted(ids) == [f"s{i}" for i in range(5)]
    adopted = {line["folder"]: line["events"] for line in logs if line["event"] == "outbox_adopted"}
    assert adopted == {str(base / "worker-1"): 0, str(base / "worker-3"): 5}
    assert not (base / "worker-3").exists()  # replayed, then removed


async def test_workers_stop_by_themselves_when_the_parent_is_killed(
    tmp_path: Path, amqp_url: str, forget_topology: list[BrokerConfig]
) -> None:
    daemon, _ = two_workers(tmp_path, amqp_url, forget_topology)
    try:
        await asyncio.to_thread(wait_for, daemon, "broker_connected", 2)
        pids = worker_pids(daemon)
        daemon.process.kill()
        daemon.process.wait(10)
        deadline = time.monotonic() + 20
        while any(_alive(pid) for pid in pids):
            assert time.monotonic() < deadline, "workers outlived their parent"
            await asyncio.sleep(0.2)
    finally:
        daemon.kill()
    stopping = [line for line in daemon.logs() if line["event"] == "bridge_stopping"]
    assert [line["signal"] for line in stopping] == ["parent_gone", "parent_gone"]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by init) counts as gone
        return "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()
    except FileNotFoundError:
        return False
