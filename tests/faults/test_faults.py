"""The fault suite (``make test-faults``): real broker, real daemon, an Adobe-like sender.

Each test runs the daemon (a subprocess, outbox in ``fallback`` mode) behind a TCP proxy that the
test controls, sends signed events at a steady rate with an Adobe-like sender that retries
whatever is not answered 2xx, injects one fault, heals it, waits for the outbox to drain, and
then reads every queue. Checks, after every fault:

- LOSS = 0: every event answered 2xx is in a queue;
- PHANTOM = 0: nothing is in a queue that was not sent;
- bodies intact (byte for byte what was sent);
- every answer within 8 s;
- the daemon alive afterwards and its log free of tracebacks.

Duplicates are allowed (at least once) and counted. Rows go to the table printed at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import orjson
import pytest
from yarl import URL

from tests.helpers import CLIENT_ID, EVENTS, SigningKey, key_folder
from tests.processes import Daemon, free_port
from tests.proxy import Proxy

pytestmark = pytest.mark.faults

LIGHTROOM = orjson.loads((EVENTS / "imaging_lightroom-job-status_succeeded.json").read_bytes())
NODE = "events-bridge@localhost"
RABBITMQCTL = Path("/usr/lib/rabbitmq/bin/rabbitmqctl")
ROOT = Path(__file__).resolve().parents[2]


def body_for(event_id: str) -> bytes:
    status = ("succeeded", "failed")[hash(event_id) % 2]
    doc = {
        **LIGHTROOM,
        "event_id": event_id,
        "recipientclientid": CLIENT_ID,
        "event": {
            **LIGHTROOM["event"],
            "body": {"jobId": event_id, "outputs": [{"status": status}]},
        },
    }
    return orjson.dumps(doc)


@dataclass
class Ledger:
    sent: set[str] = field(default_factory=set)
    ok: set[str] = field(default_factory=set)
    statuses: Counter[str] = field(default_factory=Counter)
    slowest: float = 0.0


class Sender:
    """Adobe-like: each event is retried (0.2 s doubling to 2 s) until answered 2xx."""

    def __init__(self, url: str, signer: SigningKey) -> None:
        self.url, self.signer = url, signer
        self.ledger = Ledger()

    async def run(self, count: int, rate: float, give_up_after: float) -> None:
        timeout = aiohttp.ClientTimeout(total=10)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            tasks = []
            for i in range(count):
                tasks.append(asyncio.create_task(self._one(session, f"e{i:05d}", give_up_after)))
                await asyncio.sleep(1 / rate)
            await asyncio.gather(*tasks)

    async def _one(self, session: aiohttp.ClientSession, event_id: str, give_up: float) -> None:
        body = body_for(event_id)
        self.ledger.sent.add(event_id)
        delay, deadline = 0.2, time.monotonic() + give_up
        while time.monotonic() < deadline:
            started = time.monotonic()
            try:
                async with session.post(
                    self.url, data=body, headers=self.signer.headers(body)
                ) as response:
                    await response.read()
                    outcome = str(response.status)
            except (aiohttp.ClientError, TimeoutError) as exc:
                outcome = type(exc).__name__
            self.ledger.slowest = max(self.ledger.slowest, time.monotonic() - started)
            self.ledger.statuses[outcome] += 1
            if outcome.startswith("2"):
                self.ledger.ok.add(event_id)
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)


@dataclass
class Rig:
    prefix: str
    proxy: Proxy
    amqp_url: str
    env: dict[str, str]
    config: Path
    signer: SigningKey
    daemon: Daemon | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.env['BRIDGE_PORT']}/webhook"

    async def start(self, wait: bool = True) -> Daemon:
        # The proxy lives in this event loop: wait in a thread, never block the loop.
        self.daemon = Daemon(self.config, self.env)
        if wait:
            await asyncio.to_thread(self.daemon.wait_ready, 30)
        return self.daemon

    async def settle(self, seconds: float = 60) -> None:
        """Wait until the daemon is connected and its outbox is empty."""
        deadline = time.monotonic() + seconds
        state: dict[str, Any] = {}
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError):
                state = await asyncio.to_thread(self._readyz)
                if state["broker"] == "connected" and state["outbox_depth"] == 0:
                    return
            await asyncio.sleep(0.2)
        tail = self.daemon.log_file.read_text()[-3000:] if self.daemon else ""
        raise AssertionError(f"the daemon did not drain its outbox: {state}\n{tail}")

    def _readyz(self) -> dict[str, Any]:
        import urllib.request

        with urllib.request.urlopen(self.url.replace("/webhook", "/readyz"), timeout=2) as r:
            state: dict[str, Any] = orjson.loads(r.read())
            return state

    async def delivered(self) -> list[tuple[str, bytes]]:
        connection = await aio_pika.connect(self.amqp_url)
        found: list[tuple[str, bytes]] = []
        async with connection:
            channel = await connection.channel()
            for name in (f"{self.prefix}.all", f"{self.prefix}.unrouted"):
                queue = await channel.get_queue(name)
                idle = time.monotonic()
                while time.monotonic() - idle < 1.0:
                    message = await queue.get(fail=False, no_ack=True)
                    if message is None:
                        await asyncio.sleep(0.05)
                        continue
                    found.append((message.message_id or "", message.body))
                    idle = time.monotonic()
        return found


def config_text(p: str) -> str:
    return f"""
broker:
  url: ${{BRIDGE_AMQP_URL}}
  heartbeat: 5
  publish_timeout: 3
  exchange: {p}.events
  unrouted_exchange: {p}.unrouted
  unrouted_queue: {p}.unrouted
server:
  port: ${{BRIDGE_PORT}}
  max_in_flight: 512
verification:
  key_base_url: ${{BRIDGE_KEY_BASE_URL}}
registrations:
  - {{name: default, path: /webhook, client_ids: [{CLIENT_ID}]}}
outbox:
  dir: ${{BRIDGE_OUTBOX_DIR}}
  mode: fallback
logging:
  format: json
topology:
  exchanges:
    - {{name: {p}.events, type: topic, alternate_exchange: {p}.unrouted}}
    - {{name: {p}.unrouted, type: fanout}}
  queues:
    - {{name: {p}.unrouted}}
    - {{name: {p}.all}}
  bindings:
    - {{exchange: {p}.unrouted, queue: {p}.unrouted}}
    - {{exchange: {p}.events, queue: {p}.all, routing_key: "#"}}
"""


@pytest.fixture
async def rig(amqp_url: str, tmp_path: Path) -> AsyncIterator[Rig]:
    target = URL(amqp_url)
    proxy = Proxy(target.host or "127.0.0.1", target.port or 5672)
    await proxy.start()
    prefix = f"fault.{uuid.uuid4().hex[:8]}"
    signer = SigningKey.generate()
    config = tmp_path / "bridge.yaml"
    config.write_text(config_text(prefix))
    env = {
        "BRIDGE_AMQP_URL": str(target.with_host("127.0.0.1").with_port(proxy.port)),
        "BRIDGE_PORT": str(free_port()),
        "BRIDGE_KEY_BASE_URL": key_folder(tmp_path / "keys", signer),
        "BRIDGE_OUTBOX_DIR": str(tmp_path / "outbox"),
    }
    rig = Rig(prefix, proxy, amqp_url, env, config, signer)
    yield rig
    if rig.daemon is not None:
        rig.daemon.kill()
    await proxy.stop()
    with contextlib.suppress(Exception):
        connection = await aio_pika.connect(amqp_url)
        async with connection:
            channel = await connection.channel()
            for queue in ("all", "unrouted", "capped"):
                await channel.queue_delete(f"{prefix}.{queue}")
            for exchange in ("events", "unrouted"):
                await channel.exchange_delete(f"{prefix}.{exchange}")


async def check(rig: Rig, sender: Sender, fault: str, table: list[dict[str, Any]]) -> None:
    await rig.settle()
    delivered = await rig.delivered()
    assert rig.daemon is not None
    assert rig.daemon.process.poll() is None, "the daemon died"
    rig.daemon.logs()  # raises on a traceback
    ids = Counter(i for i, _ in delivered)
    ledger = sender.ledger
    loss = ledger.ok - set(ids)
    phantom = set(ids) - ledger.sent
    table.append(
        {
            "fault": fault,
            "sent": len(ledger.sent),
            "ok": len(ledger.ok),
            "delivered": len(ids),
            "duplicates": sum(ids.values()) - len(ids),
            "loss": len(loss),
            "phantom": len(phantom),
            "slowest": ledger.slowest,
            "answers": dict(ledger.statuses),
        }
    )
    assert not loss, f"LOSS: {sorted(loss)[:10]}"
    assert not phantom, f"PHANTOM: {sorted(phantom)[:10]}"
    assert all(body == body_for(i) for i, body in delivered), "a body changed on the way"
    assert ledger.slowest < 8.0, f"an answer took {ledger.slowest:.2f} s"
    assert ledger.ok == ledger.sent, "the sender gave up on some events"


async def load_with(
    rig: Rig,
    fault: Callable[[], Awaitable[None]],
    count: int = 300,
    rate: float = 50.0,
) -> Sender:
    sender = Sender(rig.url, rig.signer)
    load = asyncio.create_task(sender.run(count, rate, give_up_after=120))
    await asyncio.sleep(1.0)
    await fault()
    await load
    return sender


def ctl(*args: str) -> None:
    subprocess.run(
        [str(RABBITMQCTL), "-q", "-n", NODE, *args], check=True, timeout=120, capture_output=True
    )


@pytest.fixture
def private_node() -> None:
    if (
        not RABBITMQCTL.exists()
        or subprocess.run(
            [str(RABBITMQCTL), "-q", "-n", NODE, "status"],
            capture_output=True,
            check=False,
            timeout=60,
        ).returncode
        != 0
    ):
        pytest.skip("needs the private node of deploy/broker.sh")


async def test_baseline(rig: Rig, table: list[dict[str, Any]]) -> None:
    await rig.start()

    async def nothing() -> None:
        return

    await check(rig, await load_with(rig, nothing), "baseline", table)


async def test_connection_reset(rig: Rig, table: list[dict[str, Any]]) -> None:
    await rig.start()

    async def reset() -> None:
        for _ in range(3):
            rig.proxy.down()
            await asyncio.sleep(0.3)
            rig.proxy.up()
            await asyncio.sleep(1.0)

    await check(rig, await load_with(rig, reset), "connection reset x3", table)


async def test_blackhole(rig: Rig, table: list[dict[str, Any]]) -> None:
    await rig.start()

    async def blackhole() -> None:
        rig.proxy.blackhole = True
        await asyncio.sleep(6)
        rig.proxy.blackhole = False
        rig.proxy.down()  # the link is garbage after dropped bytes: a heartbeat would cut it
        rig.proxy.up()

    await check(rig, await load_with(rig, blackhole), "silent blackhole 6 s", table)


async def test_confirms_lost(rig: Rig, table: list[dict[str, Any]]) -> None:
    await rig.start()

    async def lose_confirms() -> None:
        rig.proxy.drop_replies = True
        await asyncio.sleep(4)
        rig.proxy.drop_replies = False
        rig.proxy.down()
        rig.proxy.up()

    await check(rig, await load_with(rig, lose_confirms), "confirms lost 4 s", table)


async def test_torn_frames(rig: Rig, table: list[dict[str, Any]]) -> None:
    await rig.start()

    async def tear() -> None:
        size = 64  # the stair test: connections cut mid-frame after 64 B, 128 B, ... 4 KiB
        while size <= 4096:
            rig.proxy.cut_after = size
            rig.proxy.down()
            rig.proxy.up()
            await asyncio.sleep(0.7)
            size *= 2
        rig.proxy.cut_after = None
        rig.proxy.down()
        rig.proxy.up()

    await check(rig, await load_with(rig, tear), "torn frames 64 B-4 KiB", table)


async def test_latency(rig: Rig, table: list[dict[str, Any]]) -> None:
    await rig.start()

    async def slow() -> None:
        rig.proxy.latency = 0.2
        await asyncio.sleep(4)
        rig.proxy.latency = 0.0

    await check(rig, await load_with(rig, slow), "latency 200 ms", table)


async def test_broker_down_at_start(rig: Rig, table: list[dict[str, Any]]) -> None:
    rig.proxy.down()
    daemon = await rig.start(wait=False)
    await asyncio.to_thread(daemon.wait_log, "bridge_listening", 20)

    async def come_back() -> None:
        await asyncio.sleep(3)
        rig.proxy.up()

    await check(rig, await load_with(rig, come_back), "broker down at start", table)


async def test_exchange_deleted_mid_load(rig: Rig, table: list[dict[str, Any]]) -> None:
    await rig.start()

    async def delete() -> None:
        connection = await aio_pika.connect(rig.amqp_url)
        async with connection:
            channel = await connection.channel()
            await channel.exchange_delete(f"{rig.prefix}.events")

    await check(rig, await load_with(rig, delete), "exchange deleted", table)


async def test_nacks_from_a_full_queue(rig: Rig, table: list[dict[str, Any]]) -> None:
    await rig.start()
    connection = await aio_pika.connect(rig.amqp_url)
    async with connection:
        channel = await connection.channel()
        capped = await channel.declare_queue(
            f"{rig.prefix}.capped", arguments={"x-max-length": 20, "x-overflow": "reject-publish"}
        )
        await capped.bind(f"{rig.prefix}.events", routing_key="#")

        async def drain_later() -> None:
            await asyncio.sleep(3)  # meanwhile every publish is nacked: the outbox keeps them
            await capped.unbind(f"{rig.prefix}.events", routing_key="#")
            await capped.purge()

        sender = await load_with(rig, drain_later)
    await check(rig, sender, "nacks (reject-publish)", table)


async def test_bridge_sigkill_under_load(rig: Rig, table: list[dict[str, Any]]) -> None:
    await rig.start()

    async def kill_and_restart() -> None:
        assert rig.daemon is not None
        rig.daemon.process.send_signal(signal.SIGKILL)
        rig.daemon.process.wait()
        await asyncio.sleep(1)
        await rig.start()

    await check(rig, await load_with(rig, kill_and_restart), "bridge SIGKILL", table)


async def test_bridge_sigterm_under_load(rig: Rig, table: list[dict[str, Any]]) -> None:
    await rig.start()

    async def stop_and_restart() -> None:
        assert rig.daemon is not None
        rig.daemon.process.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(rig.daemon.process.wait, 30)
        assert code == 0
        await rig.start()

    await check(rig, await load_with(rig, stop_and_restart), "bridge SIGTERM", table)


async def test_unroutable_parked_by_the_alternate_exchange(
    rig: Rig, table: list[dict[str, Any]]
) -> None:
    await rig.start()

    async def unbind() -> None:  # nobody binds the events any more: the AE parks them
        connection = await aio_pika.connect(rig.amqp_url)
        async with connection:
            channel = await connection.channel()
            queue = await channel.get_queue(f"{rig.prefix}.all")
            await queue.unbind(f"{rig.prefix}.events", routing_key="#")

    await check(rig, await load_with(rig, unbind), "unroutable, with AE", table)


async def test_unroutable_without_a_place_to_go(rig: Rig, table: list[dict[str, Any]]) -> None:
    await rig.start()

    async def break_the_ae() -> None:
        # No binding and no unrouted queue: publishes come back (returned), the outbox keeps
        # them, and the bridge declares its topology again, which heals the alternate exchange.
        connection = await aio_pika.connect(rig.amqp_url)
        async with connection:
            channel = await connection.channel()
            # The unrouted queue first, while it is empty (deleting a queue deletes what it
            # holds: that would be the test losing events, not the bridge).
            await channel.queue_delete(f"{rig.prefix}.unrouted")
            queue = await channel.get_queue(f"{rig.prefix}.all")
            await queue.unbind(f"{rig.prefix}.events", routing_key="#")

    await check(rig, await load_with(rig, break_the_ae), "unroutable, AE broken", table)


async def test_outbox_disk_full(rig: Rig, table: list[dict[str, Any]], tmp_path: Path) -> None:
    mount = tmp_path / "tiny"
    mount.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        rig.env["BRIDGE_OUTBOX_DIR"] = str(mount)
        await rig.start()

        async def outage() -> None:
            rig.proxy.down()  # everything goes to the 64 KiB outbox, which fills up: 503s
            await asyncio.sleep(6)
            rig.proxy.up()

        sender = await load_with(rig, outage)
        assert sender.ledger.statuses["503"] > 0, "the outbox never filled up"
        await check(rig, sender, "outbox disk full", table)
    finally:
        if rig.daemon is not None:
            rig.daemon.kill()
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.usefixtures("private_node")
async def test_broker_restart_under_load(rig: Rig, table: list[dict[str, Any]]) -> None:
    await rig.start()

    async def restart() -> None:
        await asyncio.to_thread(ctl, "stop_app")
        await asyncio.sleep(2)
        await asyncio.to_thread(ctl, "start_app")

    await check(rig, await load_with(rig, restart), "broker restart", table)


@pytest.mark.usefixtures("private_node")
async def test_memory_alarm(rig: Rig, table: list[dict[str, Any]]) -> None:
    await rig.start()

    async def alarm() -> None:
        await asyncio.to_thread(ctl, "set_vm_memory_high_watermark", "0")
        await asyncio.sleep(5)
        await asyncio.to_thread(ctl, "set_vm_memory_high_watermark", "0.4")

    await check(rig, await load_with(rig, alarm), "memory alarm 5 s", table)


@pytest.mark.usefixtures("private_node")
async def test_disk_alarm(rig: Rig, table: list[dict[str, Any]]) -> None:
    await rig.start()

    async def alarm() -> None:
        await asyncio.to_thread(ctl, "set_disk_free_limit", "100000GB")
        await asyncio.sleep(5)
        await asyncio.to_thread(ctl, "set_disk_free_limit", "50MB")

    await check(rig, await load_with(rig, alarm), "disk alarm 5 s", table)


@pytest.mark.usefixtures("private_node")
async def test_broker_sigkill(rig: Rig, table: list[dict[str, Any]]) -> None:
    await rig.start()
    pid_file = ROOT / ".local" / "rabbitmq" / "rabbit.pid"
    if not pid_file.exists():
        pytest.skip("the private node was not started from this checkout")

    async def kill_broker() -> None:
        os.kill(int(pid_file.read_text().strip()), signal.SIGKILL)
        await asyncio.sleep(1)
        await asyncio.to_thread(
            subprocess.run,
            [str(ROOT / "deploy" / "broker.sh"), "ensure"],
            check=True,
            capture_output=True,
            timeout=300,
        )

    await check(rig, await load_with(rig, kill_broker, count=400), "broker SIGKILL", table)


async def test_sixty_second_outage_answers_no_5xx(rig: Rig, table: list[dict[str, Any]]) -> None:
    """Issue 4: a 60-second broker outage under steady load, fallback mode: no 5xx at all."""
    await rig.start()

    async def outage() -> None:
        rig.proxy.down()
        await asyncio.sleep(60)
        rig.proxy.up()

    sender = await load_with(rig, outage, count=1400, rate=20.0)
    assert not [s for s in sender.ledger.statuses if s.startswith("5")], sender.ledger.statuses
    await check(rig, sender, "broker outage 60 s", table)
