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
import base64
import os
import resource
import shutil
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aio_pika
import pytest

from tests.broker_node import BrokerNode
from tests.processes import free_port
from tests.rig import LIGHTROOM, Rig, Sender, body_for, raise_own_file_limit
from tests.rig import check as rig_check

pytestmark = pytest.mark.faults

ROOT = Path(__file__).resolve().parents[2]


async def check(rig: Rig, sender: Sender, fault: str, table: list[dict[str, Any]]) -> None:
    await rig.settle()
    rig_check(rig, sender, await rig.delivered(), table, fault)


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
        capped = await channel.declare_queue(  # exclusive: RabbitMQ 4 deprecates transient ones
            f"{rig.prefix}.capped",
            exclusive=True,
            arguments={"x-max-length": 20, "x-overflow": "reject-publish"},
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


async def test_broker_restart_under_load(
    rig: Rig, table: list[dict[str, Any]], broker_node: BrokerNode
) -> None:
    await rig.start()

    async def restart() -> None:
        await asyncio.to_thread(broker_node.ctl, "stop_app")
        await asyncio.sleep(2)
        await asyncio.to_thread(broker_node.ctl, "start_app")

    await check(rig, await load_with(rig, restart), "broker restart", table)


async def test_memory_alarm(rig: Rig, table: list[dict[str, Any]], broker_node: BrokerNode) -> None:
    await rig.start()

    async def alarm() -> None:
        await asyncio.to_thread(broker_node.ctl, "set_vm_memory_high_watermark", "0")
        await asyncio.sleep(5)
        await asyncio.to_thread(broker_node.ctl, "set_vm_memory_high_watermark", "0.4")

    await check(rig, await load_with(rig, alarm), "memory alarm 5 s", table)


async def test_disk_alarm(rig: Rig, table: list[dict[str, Any]], broker_node: BrokerNode) -> None:
    await rig.start()

    async def alarm() -> None:
        await asyncio.to_thread(broker_node.ctl, "set_disk_free_limit", "100000GB")
        await asyncio.sleep(5)
        await asyncio.to_thread(broker_node.ctl, "set_disk_free_limit", "50MB")

    await check(rig, await load_with(rig, alarm), "disk alarm 5 s", table)


async def test_broker_sigkill(
    rig: Rig, table: list[dict[str, Any]], broker_node: BrokerNode
) -> None:
    await rig.start()
    if broker_node.beam_pid() is None:
        pytest.skip("the private node was not started from this checkout (no pid file)")

    async def kill_broker() -> None:
        await asyncio.to_thread(broker_node.kill)
        await asyncio.sleep(1)
        await asyncio.to_thread(broker_node.ensure)

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


# -- issue 10: hostile input under load ---------------------------------------------------------


@pytest.fixture
def small_max_message_size(broker_node: BrokerNode) -> Iterator[None]:
    """The private node refuses messages over 1 MiB (max_message_size); set back afterwards."""
    with broker_node.max_message_size(1024 * 1024):
        yield


@pytest.mark.usefixtures("small_max_message_size")
async def test_poison_records_under_load(rig: Rig, table: list[dict[str, Any]]) -> None:
    """Events the broker refuses for their size, and events whose headers are far over a frame,
    amid steady load: the first are quarantined, the second published, nothing else held up."""
    await rig.start()
    poison: list[bytes] = []

    async def send_poison() -> None:
        for n in range(6):
            pad = {"pad": "p" * 1_200_000} if n % 2 else {"jobId": "j" * 300_000}
            body = body_for(f"poison-{n}", event={**LIGHTROOM["event"], "body": pad})
            poison.append(body)
            status, _ = await rig.post(body)
            assert status == 200
            await asyncio.sleep(0.5)

    sender = await load_with(rig, send_poison)
    await rig.settle()
    delivered = await rig.delivered()
    sender.also({f"poison-{n}": poison[n] for n in range(0, 6, 2)})  # published ones
    rig_check(rig, sender, delivered, table, "poison records under load")
    assert {f"poison-{n}" for n in range(0, 6, 2)} <= {m.message_id for m in delivered}
    kept = {k["message_id"] for k in rig.quarantined()}
    assert kept == {f"poison-{n}" for n in range(1, 6, 2)}
    assert rig.readyz()["http_status"] == 200


async def test_outbox_folder_deleted_under_load(rig: Rig, table: list[dict[str, Any]]) -> None:
    await rig.start()

    async def delete_then_crash() -> None:
        rig.proxy.down()  # everything goes to the outbox
        await asyncio.sleep(2)
        shutil.rmtree(rig.env["BRIDGE_OUTBOX_DIR"])
        await asyncio.sleep(2)
        assert rig.daemon is not None
        rig.daemon.process.send_signal(signal.SIGKILL)
        rig.daemon.process.wait()
        rig.proxy.up()
        await rig.start()

    await check(rig, await load_with(rig, delete_then_crash), "outbox folder deleted", table)


async def test_two_daemons_on_one_outbox_folder(rig: Rig, table: list[dict[str, Any]]) -> None:
    await rig.start()
    stopped: list[subprocess.CompletedProcess[str]] = []

    async def second_daemon() -> None:
        rig.proxy.down()  # a backlog in the folder the second one must not touch
        await asyncio.sleep(1)
        second = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "bridge", "serve", "--config", str(rig.config)],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=30,
            check=False,
            env={
                **os.environ,
                **rig.env,
                "BRIDGE_PORT": str(free_port()),
                "BRIDGE_AMQP_URL": rig.amqp_url,
            },
        )
        stopped.append(second)
        await asyncio.sleep(1)
        rig.proxy.up()

    await check(rig, await load_with(rig, second_daemon), "two daemons, one folder", table)
    (second,) = stopped
    assert second.returncode != 0
    assert "in use by pid" in second.stderr


async def test_idle_connection_flood(rig: Rig, table: list[dict[str, Any]]) -> None:
    text = rig.config.read_text().replace(
        "  max_in_flight: 512", "  max_in_flight: 512\n  idle_timeout: 4\n  header_timeout: 2"
    )
    rig.config.write_text(text)
    await rig.start(max_files=512)
    raise_own_file_limit()
    held: list[asyncio.StreamWriter] = []

    wave = min(500, (resource.getrlimit(resource.RLIMIT_NOFILE)[0] - 300) // 4)

    async def flood() -> None:
        for _ in range(4):  # waves of idle connections, four times what the daemon can hold
            for _ in range(wave):
                _, writer = await asyncio.open_connection("127.0.0.1", int(rig.env["BRIDGE_PORT"]))
                held.append(writer)
            await asyncio.sleep(1)

    try:
        await check(rig, await load_with(rig, flood, count=400), "idle-connection flood", table)
    finally:
        for writer in held:
            writer.close()


async def test_unsigned_slot_flood(rig: Rig, table: list[dict[str, Any]]) -> None:
    held: list[asyncio.StreamWriter] = []
    await rig.start()
    raise_own_file_limit()

    async def flood() -> None:
        signature = base64.b64encode(os.urandom(256)).decode()
        head = (
            "POST /webhook HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: 4000\r\nx-adobe-digital-signature-1: {signature}\r\n"
            f"x-adobe-digital-signature-2: {signature}\r\n"
            "x-adobe-public-key1-path: /prod/keys/pub-key-x.pem\r\n"
            "x-adobe-public-key2-path: /prod/keys/pub-key-y.pem\r\n\r\n"
        ).encode()
        for _ in range(3):  # more requests than max_in_flight, each sends no body
            for _ in range(600):
                _, writer = await asyncio.open_connection("127.0.0.1", int(rig.env["BRIDGE_PORT"]))
                writer.write(head)
                held.append(writer)
            await asyncio.sleep(1.5)

    try:
        await check(rig, await load_with(rig, flood), "unsigned slot flood", table)
    finally:
        for writer in held:
            writer.close()


async def test_huge_signed_batches(rig: Rig, table: list[dict[str, Any]]) -> None:
    await rig.start()

    async def huge() -> None:
        for shape in (b"{}", b"[]", b"1"):
            status, answer = await rig.post(b"[" + b",".join([shape] * 400_000) + b"]")
            assert (status, answer["error"]) == (413, "too_many_events")
        heavy.update({f"heavy-{i}": body_for(f"heavy-{i}", pad=["x" * 8000]) for i in range(1000)})
        status, _ = await rig.post(b"[" + b",".join(heavy.values()) + b"]")
        assert status == 200

    heavy: dict[str, bytes] = {}
    sender = await load_with(rig, huge)
    sender.also(heavy)
    await check(rig, sender, "huge signed batches", table)
