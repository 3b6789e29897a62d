"""Every promise under hostile input (issue 10), end to end: the real daemon on the real broker.

Two promises: nothing answered 200 is ever lost, and nothing forged or foreign gets in. Each
test plays an attacker or an unlucky operator against ``events-bridge serve`` (``tests/rig.py``)
and then reads the queues. The pure rules behind them are tested beside their modules
(test_envelope, test_message, test_frames, test_segments, test_outbox, test_connections).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aio_pika
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from bridge.message import Outbound
from bridge.segments import encode
from tests.broker_node import BrokerNode
from tests.conftest import ROOT
from tests.helpers import CLIENT_ID, KEY_PATH
from tests.rig import LIGHTROOM, Rig, body_for, raise_own_file_limit


async def wait_listening(rig: Rig, seconds: float = 20) -> None:
    assert rig.daemon is not None
    await asyncio.to_thread(rig.daemon.wait_log, "bridge_listening", seconds)


async def wait_for(predicate: Any, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not await asyncio.to_thread(predicate):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


def ids_of(messages: list[Any]) -> Counter[str]:
    return Counter(m.message_id or "" for m in messages)


# -- 1. poison records: every message fits the frame, a refused one never blocks the rest ------


def big_fields_case(shape: str, rig: Rig) -> tuple[bytes, set[str]]:
    """A signed event whose fields make headers far over any frame; the headers expected to be
    left out."""
    e = f"poison-{shape}"
    if shape == "job_id":  # a 300 KB jobId
        return body_for(e, event={**LIGHTROOM["event"], "body": {"jobId": "j" * 300_000}}), {
            "job-id"
        }
    if shape == "ims_org":  # a 150 KB org id, in the envelope's own header
        header = {**LIGHTROOM["event"]["header"], "imsOrgId": "o" * 150_000 + "@AdobeOrg"}
        return body_for(e, event={**LIGHTROOM["event"], "header": header}), {"ims-org-id"}
    if shape == "event_id":  # an id of 70 KB: message_id becomes its digest
        return body_for("i" * 70_000), {"event-id"}
    if shape == "copied_header":  # traceparent is copied from the request, cut to 1024
        return body_for(e), set()
    # A rule's templates: one 500 KB value, or 40 values of 3.9 KB (each under the cap, the
    # whole over the 128 KiB frame).
    body = {"jobId": e, "note": "n" * 500_000, **{f"h{i}": f"{i}" * 3900 for i in range(40)}}
    return body_for(e, event={**LIGHTROOM["event"], "body": body}), (
        {"note"} if shape == "rule_header" else set()
    )


RULE_HEADERS = "".join(f', h{i}: "{{/event/body/h{i}}}"' for i in range(40))


@pytest.mark.parametrize(
    "shape", ["job_id", "ims_org", "event_id", "copied_header", "rule_header", "many_headers"]
)
async def test_huge_fields_are_published_without_blocking_anything(rig: Rig, shape: str) -> None:
    p = rig.prefix
    headers = (
        '{note: "{/event/body/note}"}' if shape == "rule_header" else f"{{x: x{RULE_HEADERS}}}"
    )
    rig.write_config(
        routes=f"  - name: default\n    targets:\n      - exchange: {p}.events\n"
        f'        routing_key: "{{event_code}}.{{status}}"\n        headers: {headers}\n'
    )
    await rig.start()
    poison, omitted = big_fields_case(shape, rig)
    extra = {"traceparent": "t" * 5000} if shape == "copied_header" else {}
    status, answer = await rig.post(poison, extra)
    assert (status, answer.get("status")) == (200, "published"), answer
    statuses = [(await rig.post(body_for(f"after-{i}")))[0] for i in range(20)]
    assert statuses == [200] * 20
    await rig.settle()
    assert rig.readyz()["http_status"] == 200
    delivered = await rig.delivered()
    ids = ids_of(delivered)
    assert all(ids[f"after-{i}"] == 1 for i in range(20)), ids
    (message,) = [m for m in delivered if m.body == poison]  # the body exactly as signed
    left_out = set(str(message.headers.get("bridge-omitted", "")).split(",")) - {""}
    assert omitted <= left_out
    if shape == "many_headers":
        assert left_out, "40 headers of 3.9 KB cannot all fit a 128 KiB frame"
    if shape == "event_id":
        assert str(message.message_id).startswith("sha256:")
    logs = rig.daemon.logs() if rig.daemon else []
    assert not [line for line in logs if line["event"] == "broker_connection_lost"]


async def test_a_poison_record_left_in_the_outbox_by_an_older_version_is_replayed(
    rig: Rig,
) -> None:
    """A record whose content header is larger than a frame (written by a version that did not
    bound headers) is fitted on replay; the records behind it follow."""
    folder = Path(rig.env["BRIDGE_OUTBOX_DIR"])
    folder.mkdir()
    now = datetime.now(UTC)

    def record(event_id: str, **headers: str) -> bytes:
        body = body_for(event_id)
        return encode(
            Outbound(
                f"{rig.prefix}.events",
                "lightroom-job-status.succeeded",
                body,
                event_id,
                "t",
                now,
                {"event-id": event_id, **headers},
            )
        )

    frames = [record("old-poison", **{"job-id": "j" * 400_000})]
    frames += [record(f"old-{i}") for i in range(10)]
    (folder / "segment-000000000001.log").write_bytes(b"".join(frames))
    await rig.start()
    await rig.settle(30)
    delivered = await rig.delivered()
    assert set(ids_of(delivered)) == {"old-poison", *(f"old-{i}" for i in range(10))}
    (poison,) = [m for m in delivered if m.message_id == "old-poison"]
    assert poison.headers["bridge-omitted"] == "job-id"


@pytest.fixture
def small_max_message_size(broker_node: BrokerNode) -> Iterator[None]:
    """The private node refuses messages over 1 MiB (RabbitMQ's max_message_size), as a broker
    configured so does; set back afterwards."""
    with broker_node.max_message_size(1024 * 1024):
        yield


@pytest.mark.usefixtures("small_max_message_size")
async def test_an_event_the_broker_refuses_for_its_size_is_quarantined(rig: Rig) -> None:
    await rig.start()
    big = body_for("too-big", event={**LIGHTROOM["event"], "body": {"pad": "p" * 1_500_000}})
    others = [rig.post(body_for(f"beside-{i}")) for i in range(30)]
    results = await asyncio.gather(rig.post(big), *others)
    assert [status for status, _ in results] == [200] * 31
    await rig.settle(30)  # the refusal closed the channel: reconnected, the size learned
    status, answer = await rig.post(
        body_for("too-big-2", event={**LIGHTROOM["event"], "body": {"pad": "q" * 1_200_000}})
    )
    assert (status, answer["status"]) == (200, "quarantined")  # the size is known by now
    await rig.settle(30)
    assert rig.readyz()["http_status"] == 200
    ids = ids_of(await rig.delivered())
    assert {f"beside-{i}" for i in range(30)} <= set(ids)
    assert "too-big" not in ids
    kept = rig.quarantined(bodies=rig.tmp / "bodies")
    assert {k["message_id"] for k in kept} == {"too-big", "too-big-2"}
    assert all("max" in k["reason"] for k in kept)
    assert {p.read_bytes() for p in (rig.tmp / "bodies").iterdir()} == {
        big,
        body_for("too-big-2", event={**LIGHTROOM["event"], "body": {"pad": "q" * 1_200_000}}),
    }
    assert 'bridge_quarantined_total{kind="unpublishable"} 2.0' in rig.metrics()


async def test_readyz_is_not_ready_while_the_outbox_cannot_drain(rig: Rig) -> None:
    """The broker is connected but takes nothing (every publish nacked): after
    outbox.stall_seconds, /readyz says so; once it takes them again, ready."""
    text = rig.config.read_text().replace(
        "  mode: fallback", "  mode: fallback\n  stall_seconds: 2"
    )
    rig.config.write_text(text)
    await rig.start()
    connection = await aio_pika.connect(rig.amqp_url)
    async with connection:
        channel = await connection.channel()
        capped = await channel.declare_queue(  # exclusive: RabbitMQ 4 deprecates transient ones
            f"{rig.prefix}.capped",
            exclusive=True,
            arguments={"x-max-length": 0, "x-overflow": "reject-publish"},
        )
        await capped.bind(f"{rig.prefix}.events", routing_key="#")
        statuses = [(await rig.post(body_for(f"nacked-{i}")))[0] for i in range(5)]
        assert statuses == [200] * 5  # nacked, so stored
        await wait_for(lambda: rig.readyz()["outbox"] == "stalled", 15, "a stalled outbox")
        assert rig.readyz()["http_status"] == 503
        await capped.unbind(f"{rig.prefix}.events", routing_key="#")
        await rig.settle(30)
    assert rig.readyz()["http_status"] == 200


# -- 2. one outbox folder, one daemon; the port before the folder --------------------------------


def serve_once(rig: Rig, **env: str) -> subprocess.CompletedProcess[str]:
    """A second ``serve`` that is expected to stop at once."""
    return subprocess.run(
        [sys.executable, "-m", "bridge", "serve", "--config", str(rig.config)],
        capture_output=True,
        text=True,
        env={**os.environ, **rig.env, **env},
        cwd=ROOT,
        timeout=30,
        check=False,
    )


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())} if folder.exists() else {}


async def test_a_second_daemon_on_the_same_outbox_folder_stops_with_one_line(rig: Rig) -> None:
    rig.proxy.down()  # the first daemon keeps its events in the outbox
    first = await rig.start(wait=False)
    await wait_listening(rig)
    assert [(await rig.post(body_for(f"held-{i}")))[0] for i in range(20)] == [200] * 20
    folder = Path(rig.env["BRIDGE_OUTBOX_DIR"])
    before = snapshot(folder)
    second = serve_once(rig, BRIDGE_PORT=str(_free_port()))
    assert second.returncode != 0
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1, second.stderr
    assert f"in use by pid {first.process.pid}" in lines[0]
    assert "Traceback" not in second.stderr
    assert snapshot(folder) == before  # nothing read, nothing deleted
    rig.proxy.up()
    await rig.settle(30)
    assert set(ids_of(await rig.delivered())) == {f"held-{i}" for i in range(20)}


async def test_a_second_daemon_on_the_same_port_never_opens_its_outbox(rig: Rig) -> None:
    await rig.start()
    other = rig.tmp / "other-outbox"
    other.mkdir()
    stranded = encode(
        Outbound(
            f"{rig.prefix}.events",
            "k",
            body_for("not-yours"),
            "not-yours",
            "t",
            datetime.now(UTC),
            {"event-id": "not-yours"},
        )
    )
    (other / "segment-000000000001.log").write_bytes(stranded)
    before = snapshot(other)
    second = serve_once(rig, BRIDGE_OUTBOX_DIR=str(other))  # the port the first one holds
    assert second.returncode != 0
    assert len(second.stderr.strip().splitlines()) == 1, second.stderr
    assert "cannot listen" in second.stderr
    assert snapshot(other) == before  # not locked, not read, not replayed
    assert "not-yours" not in ids_of(await rig.delivered())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# -- 3. the outbox folder deleted, replaced or moved while the daemon runs ---------------------


@pytest.mark.parametrize("how", ["deleted", "replaced", "moved"])
async def test_an_outbox_folder_lost_while_running_loses_nothing(rig: Rig, how: str) -> None:
    rig.proxy.down()
    daemon = await rig.start(wait=False)
    await wait_listening(rig)
    folder = Path(rig.env["BRIDGE_OUTBOX_DIR"])
    assert [(await rig.post(body_for(f"before-{i}")))[0] for i in range(15)] == [200] * 15
    if how == "moved":
        folder.rename(folder.with_name("outbox.moved"))
        shutil.rmtree(folder.with_name("outbox.moved"))  # a cleaner that moves, then deletes
    else:
        shutil.rmtree(folder)
        if how == "replaced":
            folder.mkdir()
    # No append for a while: the watchdog writes what was there again by itself.
    await wait_for((folder / "cursor").exists, 10, "the folder written again")
    assert [(await rig.post(body_for(f"after-{i}")))[0] for i in range(15)] == [200] * 15
    daemon.process.send_signal(signal.SIGKILL)  # then a crash: only the disk is left
    daemon.process.wait(timeout=10)
    assert any(line["event"] == "outbox_folder_lost" for line in daemon.logs())
    rig.proxy.up()
    await rig.start(BRIDGE_PORT=str(_free_port()))
    await rig.settle(30)
    expected = {f"before-{i}" for i in range(15)} | {f"after-{i}" for i in range(15)}
    assert set(ids_of(await rig.delivered())) == expected


# -- 5. the recipient is the signed body's own, at the top -------------------------------------


def recipient_case(name: str) -> tuple[bytes, int]:
    event = LIGHTROOM["event"]
    ours = CLIENT_ID
    if name == "ours at the top":
        return body_for(name), 200
    if name == "theirs at the top, ours inside event":
        return body_for(
            name, recipientclientid="someone-else", event={**event, "recipientclientid": ours}
        ), 403
    if name == "none at the top, ours inside event":
        doc = {**orjson.loads(body_for(name)), "event": {**event, "recipient_client_id": ours}}
        del doc["recipientclientid"]
        return orjson.dumps(doc), 403
    if name == "the two top-level names disagree":
        return body_for(name, recipient_client_id="someone-else"), 403
    if name == "the two top-level names agree":
        return body_for(name, recipient_client_id=ours), 200
    if name == "a list at the top":
        return body_for(name, recipientclientid=[ours, "someone-else"]), 403
    if name == "cloudevent, ours only in data":
        ce = {
            "specversion": "1.0",
            "type": "t",
            "eventid": name,
            "data": {"recipientclientid": ours},
        }
        return orjson.dumps(ce), 403
    if name == "marketo wrapped, ours beside the wrapped cloudevent":
        wrapped = {
            "eventid": name,
            "event": {"body": {"specversion": "1.0", "type": "m"}, "recipientclientid": ours},
        }
        return orjson.dumps(wrapped), 200
    if name == "marketo wrapped, theirs at the top":
        wrapped = {
            "eventid": name,
            "recipientclientid": "someone-else",
            "event": {"body": {"specversion": "1.0", "type": "m"}, "recipientclientid": ours},
        }
        return orjson.dumps(wrapped), 403
    raise AssertionError(name)


RECIPIENT_CASES = [
    "ours at the top",
    "theirs at the top, ours inside event",
    "none at the top, ours inside event",
    "the two top-level names disagree",
    "the two top-level names agree",
    "a list at the top",
    "cloudevent, ours only in data",
    "marketo wrapped, ours beside the wrapped cloudevent",
    "marketo wrapped, theirs at the top",
]


async def test_only_the_signed_bodys_own_recipient_vouches_for_it(rig: Rig) -> None:
    await rig.start()
    expected: dict[str, int] = {}
    for name in RECIPIENT_CASES:
        body, status = recipient_case(name)
        answered, answer = await rig.post(body)
        assert answered == status, (name, answer)
        expected[name] = status
        # in a batch too: one foreign element refuses the whole request
        answered, _ = await rig.post(b"[" + body_for(f"{name}-mate") + b"," + body + b"]")
        assert answered == status, name
    await rig.settle()
    delivered = set(ids_of(await rig.delivered()))
    for name, status in expected.items():
        assert (name in delivered) == (status == 200), name
        assert (f"{name}-mate" in delivered) == (status == 200), name


# -- 6. idle and slow connections cannot take every descriptor ------------------------------------


async def open_idle(
    port: int, count: int
) -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    return [await asyncio.open_connection("127.0.0.1", port) for _ in range(count)]


async def closed_by_peer(reader: asyncio.StreamReader, seconds: float) -> bool:
    """Whether the other end has closed the connection (read gives EOF, or a reset)."""
    try:
        return await asyncio.wait_for(reader.read(65536), seconds) == b""
    except ConnectionError:
        return True
    except TimeoutError:
        return False


async def test_a_flood_of_idle_connections_cannot_take_every_descriptor(rig: Rig) -> None:
    """Default settings, a process allowed 256 descriptors, 400 connections that send
    nothing: the daemon holds what it can, sheds the longest idle, and serves new ones."""
    await rig.start(max_files=256)  # 192 connections at most
    raise_own_file_limit()
    idle = await open_idle(int(rig.env["BRIDGE_PORT"]), 400)  # twice what it can hold
    try:
        for n in range(5):
            started = time.monotonic()
            status, answer = await rig.post(body_for(f"through-the-flood-{n}"))
            assert status == 200, answer
            assert time.monotonic() - started < 2.0
            assert rig.readyz()["http_status"] == 200
    finally:
        for _, writer in idle:
            writer.close()
    assert rig.daemon is not None
    logs = rig.daemon.logs()
    assert any(line["event"] == "connection_bound_lowered" for line in logs)
    assert 'bridge_connections_closed_total{reason="shed_idle"}' in rig.metrics()
    await rig.settle()
    assert {f"through-the-flood-{n}" for n in range(5)} <= set(ids_of(await rig.delivered()))


async def test_idle_and_trickling_connections_are_closed_on_time(rig: Rig) -> None:
    text = rig.config.read_text().replace(
        "  max_in_flight: 512", "  max_in_flight: 512\n  idle_timeout: 3\n  header_timeout: 2"
    )
    rig.config.write_text(text)
    await rig.start()
    port = int(rig.env["BRIDGE_PORT"])
    idle = await open_idle(port, 50)
    # A slowloris: headers one byte at a time; closed at the header timeout.
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    trickle_started = time.monotonic()
    with contextlib.suppress(ConnectionError):
        for byte in b"POST /webhook HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100:
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(0.2)
            if reader.at_eof() or time.monotonic() - trickle_started > 6:
                break
    writer.close()
    assert time.monotonic() - trickle_started < 4.0, "the trickle was not cut at 2 s"
    await asyncio.sleep(2.0)  # the idle ones go at the idle timeout, 3 s after they opened
    still_open = 0
    for r, w in idle:
        if not await closed_by_peer(r, 0.05):
            still_open += 1
        w.close()
    assert still_open == 0
    metrics = rig.metrics()
    assert 'bridge_connections_closed_total{reason="idle_timeout"} 50.0' in metrics, [
        line for line in metrics.splitlines() if line.startswith("bridge_connections_closed_total")
    ]
    assert 'bridge_connections_closed_total{reason="headers_timeout"} 1.0' in metrics
    assert (await rig.post(body_for("after-the-timeouts")))[0] == 200


# -- 7. unsigned and slow requests cannot take the slots of signed ones --------------------------


def forged_headers(length: int, key_path: str = KEY_PATH) -> bytes:
    signature = base64.b64encode(os.urandom(256)).decode()
    return (
        "POST /webhook HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {length}\r\n"
        f"x-adobe-digital-signature-1: {signature}\r\nx-adobe-digital-signature-2: {signature}\r\n"
        f"x-adobe-public-key1-path: {key_path}\r\nx-adobe-public-key2-path: {key_path}\r\n\r\n"
    ).encode()


async def test_requests_that_never_send_their_body_do_not_starve_signed_ones(rig: Rig) -> None:
    text = rig.config.read_text().replace("  max_in_flight: 512", "  max_in_flight: 64")
    rig.config.write_text(text)
    await rig.start()
    port = int(rig.env["BRIDGE_PORT"])
    flood = []
    for _ in range(300):  # far more than the 64 slots: headers, then no body at all
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(forged_headers(5000))
        flood.append((reader, writer))
    await asyncio.sleep(0.5)
    started = time.monotonic()
    results = await asyncio.gather(*(rig.post(body_for(f"genuine-{i}")) for i in range(50)))
    assert [s for s, _ in results] == [200] * 50
    assert time.monotonic() - started < 5.0
    answers = []
    for reader, writer in flood:  # each is answered 503 at the body timeout, then closed
        answers.append(await asyncio.wait_for(reader.read(4096), 10))
        writer.close()
    assert all(a.startswith(b"HTTP/1.1 503") and b"body_timeout" in a for a in answers)
    await rig.settle()
    assert {f"genuine-{i}" for i in range(50)} <= set(ids_of(await rig.delivered()))


async def test_unsigned_requests_are_refused_before_their_body_is_read(rig: Rig) -> None:
    await rig.start()
    reader, writer = await asyncio.open_connection("127.0.0.1", int(rig.env["BRIDGE_PORT"]))
    writer.write(
        b"POST /webhook HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 100000\r\n\r\n"
    )
    answer = await asyncio.wait_for(reader.read(4096), 3)  # no body sent, answered at once
    assert answer.startswith(b"HTTP/1.1 401")
    assert await asyncio.wait_for(reader.read(4096), 3) == b""  # and closed
    writer.close()


async def test_made_up_key_paths_do_not_delay_a_request_whose_key_is_known(rig: Rig) -> None:
    """The key host is slow for paths it does not have (2 s); a flood of made-up paths must not
    hold up a genuine request whose key must be fetched again (its cache entry expired)."""
    served: list[str] = []

    async def key(request: web.Request) -> web.Response:
        served.append(request.path)
        if request.path == KEY_PATH:
            return web.Response(body=rig.signer.public_pem)
        await asyncio.sleep(2)
        raise web.HTTPNotFound()

    app = web.Application()
    app.router.add_get("/{tail:.*}", key)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        text = rig.config.read_text().replace(
            "  key_base_url: ${BRIDGE_KEY_BASE_URL}",
            "  key_base_url: ${BRIDGE_KEY_BASE_URL}\n  key_cache_seconds: 1",
        )
        rig.config.write_text(text)
        await rig.start(BRIDGE_KEY_BASE_URL=str(server.make_url("")).rstrip("/"))
        assert (await rig.post(body_for("first")))[0] == 200  # the key is known from now on
        await asyncio.sleep(1.2)  # and its cache entry has expired
        forged = [
            rig.post(
                body_for(f"forged-{i}"),
                {
                    "x-adobe-public-key1-path": f"/prod/keys/pub-key-made-up-{i}.pem",
                    "x-adobe-public-key2-path": f"/prod/keys/pub-key-made-up-{i}b.pem",
                },
            )
            for i in range(100)
        ]
        flood = asyncio.gather(*forged)
        await asyncio.sleep(0.2)
        started = time.monotonic()
        status, answer = await rig.post(body_for("genuine"))
        assert status == 200, answer
        assert time.monotonic() - started < 1.5
        statuses = Counter(s for s, _ in await flood)
        assert set(statuses) <= {401, 503}
        assert len(served) < 40  # made-up paths were fetched at a bounded rate
    finally:
        await server.close()


# -- 8. the sender's mistakes are 4xx (or nothing, when it left), never a 500 --------------------


async def raw_exchange(port: int, data: bytes, close_after: bool = False) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    if close_after:
        await asyncio.sleep(0.3)  # the handler is reading the body by now
        writer.close()
        return b""
    try:
        return await asyncio.wait_for(reader.read(65536), 5)
    finally:
        writer.close()


BAD_VALIDATION_URLS = [
    "https://[",
    "https://csm.adobe.io:99999/csm",
    "https://csm.adobe.io:8443/csm/registrations/validate?id=1",
    "https://csm.adobe.io\\@evil.example/",
    "https://user:pw@csm.adobe.io/csm/registrations/validate",
    "https://evil.adobe.io/csm/registrations/validate",
    "https://csm.adobe.io.evil.example/",
    "http://csm.adobe.io/csm/registrations/validate",
    "https://csm.adobe.io/csm\n/x",
    "javascript:alert(1)",
    "https://csm.adobe.io" + "/a" * 2000,
]


async def test_a_validation_url_that_is_not_adobes_plainly_is_a_400(rig: Rig) -> None:
    await rig.start()
    for url in BAD_VALIDATION_URLS:
        status, answer = await rig.post(
            orjson.dumps({"validationUrl": url}),
            {"content-type": "application/json"},
            signed=False,
        )
        assert (status, answer["error"]) == (400, "validation_url_not_adobe"), (url, answer)
    assert 'status="500"' not in rig.metrics()
    assert "bridge_validation_url_posts_total{" not in rig.metrics()


async def test_the_senders_mistakes_are_refused_not_crashes(rig: Rig) -> None:
    await rig.start()
    port = int(rig.env["BRIDGE_PORT"])
    good = await rig.post(
        orjson.dumps(
            {"validationUrl": f"https://csm.adobe.io/csm/registrations/validate?id={uuid.uuid4()}"}
        ),
        {"content-type": "application/json"},
        signed=False,
    )
    assert good[0] == 200
    body = body_for("gzipped")
    for encoding in ("gzip", "br", "deflate", "zstd", "x-made-up"):  # none of them really
        status, answer = await rig.post(body, {"content-encoding": encoding})
        assert (status, answer["error"]) == (415, "unsupported_content_encoding"), encoding
    # A client that goes away in the middle of its body.
    half = rig.signer.headers(body)
    head = "".join(f"{k}: {v}\r\n" for k, v in half.items())
    for _ in range(3):
        await raw_exchange(
            port,
            b"POST /webhook HTTP/1.1\r\nHost: x\r\n"
            + f"{head}Content-Length: {len(body)}\r\n\r\n".encode()
            + body[: len(body) // 2],
            close_after=True,
        )
    # aiohttp's own refusals, as JSON like every other.
    bad_line = await raw_exchange(port, b"GARBAGE\x01 / HTTP/1.1\r\n\r\n")
    assert bad_line.startswith((b"HTTP/1.0 400", b"HTTP/1.1 400"))
    assert b'"error":"bad_request"' in bad_line
    too_long = await raw_exchange(
        port, b"GET /healthz HTTP/1.1\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n"
    )
    assert b"application/json" in too_long.split(b"\r\n\r\n")[0]
    assert (await rig.post(b"{}", path="/nowhere"))[1]["error"] == "not_found"
    async with asyncio.timeout(5):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"PUT /webhook HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        put = await reader.read(4096)
        writer.close()
    assert put.startswith(b"HTTP/1.1 405")
    assert b"Allow:" in put
    assert b"method_not_allowed" in put
    await asyncio.sleep(0.5)
    metrics = rig.metrics()
    assert 'status="500"' not in metrics
    assert 'outcome="client_gone",registration="default",status="499"} 3.0' in metrics
    logs = rig.daemon.logs() if rig.daemon else []
    assert not [line for line in logs if line["event"] == "request_crashed"]


# -- 9. bounded work for signed input -----------------------------------------------------------


async def test_a_huge_signed_batch_is_refused_before_any_work_per_element(rig: Rig) -> None:
    await rig.start()
    assert rig.daemon is not None
    before = rig.daemon.rss_bytes
    for shape in (b"{}", b"1", b"[]", b'{"a":[1,2,3]}'):
        huge = b"[" + b",".join([shape] * 300_000) + b"]"
        started = time.monotonic()
        status, answer = await rig.post(huge)
        assert (status, answer["error"]) == (413, "too_many_events")
        assert time.monotonic() - started < 2.0
    assert rig.daemon.rss_bytes - before < 150 * 1024 * 1024
    # Just within the bound, and heavy (8 MB): parsed off the loop, which keeps answering.
    deep = b"[" * 400 + b"]" * 400
    heavy = [body_for(f"heavy-{i}", pad=[orjson.Fragment(deep)] * 9) for i in range(1000)]
    batch = asyncio.create_task(rig.post(b"[" + b",".join(heavy) + b"]"))
    slowest = 0.0
    while not batch.done():
        started = time.monotonic()
        await asyncio.to_thread(rig.readyz)
        slowest = max(slowest, time.monotonic() - started)
        await asyncio.sleep(0.05)
    status, answer = batch.result()
    assert (status, answer["events"]) == (200, 1000), answer
    # Parsed on the loop, this batch would hold it for its whole parse (7 s on the development
    # machine); off the loop, the loop waits only for its turns of the GIL (about a second when
    # the two cores are busy with the suite).
    assert slowest < 2.5, f"/readyz waited {slowest:.2f} s while the batch was parsed"
    await rig.settle()
    assert {f"heavy-{i}" for i in range(1000)} <= set(ids_of(await rig.delivered()))


async def test_label_values_from_signed_input_are_bounded(rig: Rig) -> None:
    """Default settings: 1,000 event codes and statuses made up by a signer give at most the
    first 100 codes and 20 statuses their own series; /metrics stays small."""
    await rig.start()
    for batch in range(20):
        events = [
            body_for(
                f"code-{batch}-{i}",
                event={
                    **LIGHTROOM["event"],
                    "header": {
                        **LIGHTROOM["event"]["header"],
                        "eventCode": f"made-up-{batch}-{i}",
                    },
                    "body": {"status": f"s{batch}-{i}"},
                },
            )
            for i in range(50)
        ]
        assert (await rig.post(b"[" + b",".join(events) + b"]"))[0] == 200
    metrics = rig.metrics()
    series = [
        line for line in metrics.splitlines() if line.startswith("bridge_events_published_total{")
    ]
    # 1,000 pairs of code and status, each seen once: the first 100 codes (the first 20 with
    # their own status), then "other"; without a bound, 1,000 series.
    assert len(series) <= 100 + 1
    assert 'event_code="other"' in metrics
    assert len(metrics) < 500_000


# -- 11. a slow confirm and a stored copy never both reach the queue ---------------------------


async def test_a_batch_confirmed_late_is_published_once_not_also_replayed(rig: Rig) -> None:
    await rig.start(BRIDGE_PUBLISH_TIMEOUT="1")
    rig.proxy.latency = 0.7  # each way: every confirm comes after the 1 s publish timeout
    status, answer = await rig.post(
        b"[" + b",".join(body_for(f"late-{i}") for i in range(60)) + b"]"
    )
    assert (status, answer["status"]) == (200, "stored"), answer
    rig.proxy.latency = 0.0
    await rig.settle(40)
    ids = ids_of(await rig.delivered())
    assert set(ids) == {f"late-{i}" for i in range(60)}
    assert sum(ids.values()) == 60, "an event reached the queue twice"
    metrics = rig.metrics()
    assert "bridge_publish_late_confirms_total 60.0" in metrics
    assert "bridge_outbox_replayed_total 0.0" in metrics
    assert "bridge_events_published_total" in metrics


# -- smaller things ---------------------------------------------------------------------------


async def test_a_batch_naming_one_event_twice_publishes_it_once(rig: Rig) -> None:
    await rig.start()
    first, second = body_for("twice"), body_for("twice", note="another body")
    status, answer = await rig.post(b"[" + first + b"," + second + b"," + body_for("once") + b"]")
    assert (status, answer["messages"]) == (200, 2)
    await rig.settle()
    delivered = await rig.delivered()
    assert ids_of(delivered) == Counter({"twice": 1, "once": 1})
    assert [m.body for m in delivered if m.message_id == "twice"] == [first]


async def test_events_from_the_outbox_are_counted_as_published_once(rig: Rig) -> None:
    rig.proxy.down()
    await rig.start(wait=False)
    await wait_listening(rig)
    assert [(await rig.post(body_for(f"counted-{i}")))[0] for i in range(10)] == [200] * 10
    metrics = rig.metrics()
    assert "bridge_events_stored_total 10.0" in metrics
    assert "bridge_events_published_total{" not in metrics
    rig.proxy.up()
    await rig.settle(30)
    published = [
        float(line.rsplit(" ", 1)[1])
        for line in rig.metrics().splitlines()
        if line.startswith("bridge_events_published_total{")
    ]
    assert sum(published) == 10


# -- in process, on the real broker: the backstop for refusals of an unknown kind, durability ----


@pytest.mark.usefixtures("small_max_message_size")
async def test_a_record_the_broker_refuses_alone_twice_is_quarantined(
    amqp_url: str, tmp_path: Path, forget_topology: list[Any]
) -> None:
    """The backstop for refusals the publisher cannot tell before sending: here the broker's
    size limit, with the publisher forbidden to learn it. The replayer sends the failed batch's
    records one at a time, quarantines the one the broker refuses alone twice, and publishes
    the rest."""
    from bridge.outbox import Outbox
    from bridge.publisher import AmqpPublisher
    from tests.helpers import make_config

    config = make_config(amqp_url=amqp_url)
    forget_topology.append(config.broker)

    class Unlearning(AmqpPublisher):
        def _learn(self, exc: BaseException | None) -> None:
            return None

    publisher = Unlearning(config.broker, config.topology)
    await publisher.start()
    assert await publisher.wait_ready(10)
    outbox = Outbox(tmp_path / "outbox", 1 << 26, publisher)
    await outbox.open()
    try:
        now = datetime.now(UTC)

        def message(n: int, size: int) -> Outbound:
            body = orjson.dumps({"n": n, "pad": "p" * size})
            return Outbound(config.broker.exchange, "k", body, f"m{n}", "t", now, {})

        await outbox.append([message(n, 1_500_000 if n == 7 else 100) for n in range(20)])
        assert await outbox.drain(30)
        connection = await aio_pika.connect(amqp_url)
        async with connection:
            channel = await connection.channel()
            queue = await channel.get_queue(config.broker.unrouted_queue)
            got: set[str | None] = set()
            while (m := await queue.get(fail=False, no_ack=True)) is not None:
                got.add(m.message_id)  # those in flight with the refused one may come twice
        assert got == {f"m{n}" for n in range(20) if n != 7}
        from bridge.spool import read_quarantine

        ((kept, meta),) = read_quarantine(tmp_path / "outbox")
        assert kept.message_id == "m7"
        assert "PRECONDITION_FAILED" in meta["quarantine_reason"]
    finally:
        await outbox.close()
        await publisher.close()


async def test_the_outbox_folder_entries_are_durable_before_an_answer(
    amqp_url: str, tmp_path: Path, forget_topology: list[Any], fsyncs: list[str]
) -> None:
    """POSIX: a file is durable once its folder entry is. The folder is fsync'ed after a
    segment is created and before anything is answered from it; after the cursor's rename."""
    from bridge.outbox import Outbox
    from bridge.publisher import AmqpPublisher
    from tests.helpers import make_config

    folder = tmp_path / "outbox"
    calls = fsyncs
    config = make_config(amqp_url=amqp_url)
    forget_topology.append(config.broker)
    publisher = AmqpPublisher(config.broker, config.topology)
    outbox = Outbox(folder, 1 << 20, publisher)
    await outbox.open()  # the broker is not started yet: appends wait in the outbox
    try:
        segment_created = calls.index(str(folder))
        assert any(c.endswith(".log") for c in calls[segment_created:]) is False
        out = Outbound(config.broker.exchange, "k", b"{}", "d1", "t", datetime.now(UTC), {})
        await outbox.append([out])
        segment = next(c for c in calls if c.endswith(".log"))
        assert calls.index(str(folder)) < calls.index(segment)  # its entry first, then data
        await publisher.start()
        assert await outbox.drain(20)
        cursor = calls.index(str(folder / "cursor.tmp"))
        assert str(folder) in calls[cursor + 1 :]  # the rename made durable
    finally:
        await outbox.close()
        await publisher.close()
