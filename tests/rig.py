"""A real daemon on a real broker for end-to-end tests: the config, an Adobe-like sender, the
queues read back, and the checks (LOSS, PHANTOM) of the fault suite.

The daemon (``events-bridge serve`` in a subprocess, outbox in ``fallback`` mode) reaches the
broker through a TCP proxy the test controls; its exchange ``<prefix>.events`` has a queue
``<prefix>.all`` bound to ``#``, and ``<prefix>.unrouted`` catches the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import resource
import subprocess
import sys
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import orjson
from yarl import URL

from tests.conftest import ROOT
from tests.helpers import CLIENT_ID, EVENTS, SigningKey, key_folder
from tests.processes import Daemon, free_port
from tests.proxy import Proxy

LIGHTROOM = orjson.loads((EVENTS / "imaging_lightroom-job-status_succeeded.json").read_bytes())
# The first columns of every fault table (tests/faults, tests/cluster), and a row's cells in them.
FAULT_COLUMNS = (
    "fault",
    "sent",
    "answered 2xx",
    "delivered",
    "duplicates",
    "loss",
    "phantom",
    "slowest answer",
)


def fault_cells(row: dict[str, Any]) -> tuple[str, ...]:
    """A fault row's cells under :data:`FAULT_COLUMNS`."""
    counts = (row["sent"], row["ok"], row["delivered"], row["duplicates"], row["loss"])
    return (row["fault"], *map(str, counts), str(row["phantom"]), f"{row['slowest']:.2f} s")


def body_for(event_id: str, **extra: Any) -> bytes:
    status = ("succeeded", "failed")[hash(event_id) % 2]
    doc = {
        **LIGHTROOM,
        "event_id": event_id,
        "recipientclientid": CLIENT_ID,
        "event": {
            **LIGHTROOM["event"],
            "body": {"jobId": event_id, "outputs": [{"status": status}]},
        },
        **extra,
    }
    return orjson.dumps(doc)


@dataclass
class Ledger:
    bodies: dict[str, bytes] = field(default_factory=dict)  # what was sent under each id
    sent: set[str] = field(default_factory=set)
    ok: set[str] = field(default_factory=set)
    statuses: Counter[str] = field(default_factory=Counter)
    slowest: float = 0.0


class Sender:
    """Adobe-like: each event is retried (0.2 s doubling to 2 s) until answered 2xx."""

    def __init__(self, url: str, signer: SigningKey) -> None:
        self.url, self.signer = url, signer
        self.ledger = Ledger()

    def also(self, bodies: dict[str, bytes], answered: bool = True) -> None:
        """Events the test sent itself, beside the sender's: counted as sent (and answered)."""
        self.ledger.bodies.update(bodies)
        self.ledger.sent |= set(bodies)
        if answered:
            self.ledger.ok |= set(bodies)

    async def run(self, count: int, rate: float, give_up_after: float, prefix: str = "e") -> None:
        timeout = aiohttp.ClientTimeout(total=10)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            tasks = []
            for i in range(count):
                event_id = f"{prefix}{i:05d}"
                tasks.append(asyncio.create_task(self._one(session, event_id, give_up_after)))
                await asyncio.sleep(1 / rate)
            await asyncio.gather(*tasks)

    async def _one(self, session: aiohttp.ClientSession, event_id: str, give_up: float) -> None:
        body = body_for(event_id)
        self.ledger.sent.add(event_id)
        self.ledger.bodies[event_id] = body
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


def config_text(p: str, server: str = "", routes: str = "", extra: str = "") -> str:
    """The daemon's YAML: ``server`` lines are added to its section, ``routes`` replaces the
    default rule (indented list items), ``extra`` adds top-level sections."""
    routes = routes or (
        "  - name: default\n    targets:\n"
        f'      - {{exchange: {p}.events, routing_key: "{{event_code}}.{{status}}"}}\n'
    )
    return f"""
broker:
  url: ${{BRIDGE_AMQP_URL}}
  heartbeat: 5
  publish_timeout: ${{BRIDGE_PUBLISH_TIMEOUT:-3}}
  exchange: {p}.events
  unrouted_exchange: {p}.unrouted
  unrouted_queue: {p}.unrouted
server:
  port: ${{BRIDGE_PORT}}
  max_in_flight: 512
{server}
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
routes:
{routes}
{extra}
"""


@dataclass
class Rig:
    prefix: str
    proxy: Proxy
    amqp_url: str
    env: dict[str, str]
    config: Path
    signer: SigningKey
    tmp: Path
    daemon: Daemon | None = None
    others: list[Daemon] = field(default_factory=list)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.env['BRIDGE_PORT']}"

    @property
    def url(self) -> str:
        return self.base + "/webhook"

    def write_config(self, **parts: str) -> None:
        self.config.write_text(config_text(self.prefix, **parts))

    async def start(self, wait: bool = True, max_files: int | None = None, **env: str) -> Daemon:
        # The proxy lives in this event loop: wait in a thread, never block the loop.
        self.env.update(env)
        self.daemon = Daemon(self.config, self.env, max_files=max_files)
        self.others.append(self.daemon)
        if wait:
            await asyncio.to_thread(self.daemon.wait_ready, 30)
        return self.daemon

    async def settle(self, seconds: float = 60) -> None:
        """Wait until the daemon is connected and its outbox is empty."""
        deadline = time.monotonic() + seconds
        state: dict[str, Any] = {}
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError):
                state = await asyncio.to_thread(self.readyz)
                if state["broker"] == "connected" and state["outbox_depth"] == 0:
                    return
            await asyncio.sleep(0.2)
        tail = self.daemon.log_file.read_text()[-3000:] if self.daemon else ""
        raise AssertionError(f"the daemon did not drain its outbox: {state}\n{tail}")

    def readyz(self) -> dict[str, Any]:
        try:
            with urllib.request.urlopen(self.base + "/readyz", timeout=2) as r:
                state: dict[str, Any] = orjson.loads(r.read())
        except urllib.error.HTTPError as error:  # 503: not ready, the same JSON
            state = orjson.loads(error.read())
            state["http_status"] = error.code
            return state
        state["http_status"] = 200
        return state

    def metrics(self) -> str:
        with urllib.request.urlopen(self.base + "/metrics", timeout=5) as r:
            text: str = r.read().decode()
            return text

    async def post(
        self,
        body: bytes,
        headers: dict[str, str] | None = None,
        signed: bool = True,
        path: str = "/webhook",
    ) -> tuple[int, dict[str, Any]]:
        """POST ``body`` (signed as Adobe signs, unless not ``signed``); the status and JSON."""
        sent = self.signer.headers(body, **(headers or {})) if signed else (headers or {})
        data: Any = io.BytesIO(body) if len(body) > 1 << 20 else body  # aiohttp warns of bytes
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session,
            session.post(self.base + path, data=data, headers=sent) as response,
        ):
            answer = await response.read()
            return response.status, orjson.loads(answer) if answer else {}

    def quarantined(self, bodies: Path | None = None) -> list[dict[str, Any]]:
        """What ``events-bridge quarantine --json`` lists (and, with ``bodies``, writes)."""
        extra = [] if bodies is None else ["--bodies", str(bodies)]
        listed = subprocess.run(
            [
                sys.executable,
                "-m",
                "bridge",
                "quarantine",
                "--config",
                str(self.config),
                "--json",
                *extra,
            ],
            capture_output=True,
            text=True,
            env={**os.environ, **self.env},
            cwd=ROOT,
            timeout=60,
            check=False,
        )
        assert listed.returncode == 0, listed.stderr
        return [orjson.loads(line) for line in listed.stdout.splitlines()]

    async def delivered(self, queues: tuple[str, ...] = ("all", "unrouted")) -> list[Any]:
        """Every message in the test's queues (taken off them): aio-pika messages."""
        connection = await aio_pika.connect(self.amqp_url)
        found: list[Any] = []
        async with connection:
            channel = await connection.channel()
            for name in queues:
                queue = await channel.get_queue(f"{self.prefix}.{name}")
                idle = time.monotonic()
                while time.monotonic() - idle < 1.0:
                    message = await queue.get(fail=False, no_ack=True)
                    if message is None:
                        await asyncio.sleep(0.05)
                        continue
                    found.append(message)
                    idle = time.monotonic()
        return found


def raise_own_file_limit() -> None:
    """This test process opens thousands of connections: its soft descriptor limit to the hard."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


@contextlib.asynccontextmanager
async def make_rig(amqp_url: str, tmp_path: Path) -> AsyncIterator[Rig]:
    target = URL(amqp_url)
    proxy = Proxy(target.host or "127.0.0.1", target.port or 5672)
    await proxy.start()
    prefix = f"rig.{uuid.uuid4().hex[:8]}"
    signer = SigningKey.generate()
    config = tmp_path / "bridge.yaml"
    config.write_text(config_text(prefix))
    env = {
        "BRIDGE_AMQP_URL": str(target.with_host("127.0.0.1").with_port(proxy.port)),
        "BRIDGE_PORT": str(free_port()),
        "BRIDGE_KEY_BASE_URL": key_folder(tmp_path / "keys", signer),
        "BRIDGE_OUTBOX_DIR": str(tmp_path / "outbox"),
    }
    rig = Rig(prefix, proxy, amqp_url, env, config, signer, tmp_path)
    try:
        yield rig
    finally:
        for daemon in rig.others:
            daemon.kill()
        await proxy.stop()
        with contextlib.suppress(Exception):
            connection = await aio_pika.connect(amqp_url)
            async with connection:
                channel = await connection.channel()
                for queue in ("all", "unrouted", "capped"):
                    await channel.queue_delete(f"{prefix}.{queue}")
                for exchange in ("events", "unrouted"):
                    await channel.exchange_delete(f"{prefix}.{exchange}")


def check(
    rig: Rig, sender: Sender, delivered: list[Any], table: list[dict[str, Any]], fault: str
) -> dict[str, Any]:
    """LOSS, PHANTOM and the rest: a row of the fault table (appended first), then asserted."""
    assert rig.daemon is not None
    assert rig.daemon.process.poll() is None, "the daemon died"
    rig.daemon.logs()  # raises on a traceback
    ids = Counter(m.message_id or "" for m in delivered)
    ledger = sender.ledger
    loss = ledger.ok - set(ids)
    phantom = set(ids) - ledger.sent
    row = {
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
    table.append(row)
    assert not loss, f"LOSS: {sorted(loss)[:10]}"
    assert not phantom, f"PHANTOM: {sorted(phantom)[:10]}"
    changed = [m.message_id for m in delivered if m.body != ledger.bodies.get(m.message_id or "")]
    assert not changed, f"a body changed on the way: {changed[:5]}"
    assert ledger.slowest < 8.0, f"an answer took {ledger.slowest:.2f} s"
    assert ledger.ok == ledger.sent, "the sender gave up on some events"
    return row
