"""Two bridge replicas on the cluster, Adobe-like load spread over both, and what they saw.

Each replica is a real ``events-bridge serve`` (``tests.processes.Daemon``: its own port, outbox
folder and log file) whose ``BRIDGE_AMQP_URL`` lists every node of the cluster. The topology is
the fault suite's (``tests.rig.config_text``) with its queues quorum queues of three replicas
(``x-quorum-initial-group-size: 3``). Each replica gets its own Adobe-like sender
(``tests.rig.Sender``: signed events, retried until answered 2xx, every answer recorded).

While the load runs, each replica's ``/metrics`` is read every :data:`SAMPLE_EVERY` seconds: the
node in use (``bridge_broker_node_info``), and how many events were published directly (confirmed
and not replayed from the outbox: ``bridge_events_published`` minus ``bridge_outbox_replayed``).
"Publishing resumed on another node" is the first sample after a fault that names another node
and has more direct publishes than the sample before it, from which on for :data:`STEADY` s the
direct publishes grow and the outbox takes nothing (``bridge_events_stored`` stays).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import shutil
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import orjson

from tests.cluster.cluster import Cluster, Node, amqp_answers
from tests.helpers import SigningKey, key_folder
from tests.processes import Daemon, free_port
from tests.rig import Ledger, Sender, config_text

SAMPLE_EVERY = 0.2
RATE = 20.0  # events per second and replica
GIVE_UP_AFTER = 120.0  # the sender's retries of one event
DEADLINE = 8.0  # every answer within this
RESUME_WITHIN = 10.0  # publishing directly on another node within this after a fault
LONGEST = 120.0  # seconds of load at most, whatever the fault takes
STEADY = 2.0  # "resumed": this long publishing directly, nothing into the outbox


@dataclass(frozen=True)
class Sample:
    t: float  # time.monotonic()
    node: str | None  # host:port in use, None when not connected
    published: float
    replayed: float
    stored: float
    depth: float

    @property
    def direct(self) -> float:
        """Events confirmed by the broker on their first publish (not replayed)."""
        return self.published - self.replayed


def parse_metrics(text: str, t: float) -> Sample:
    node: str | None = None
    totals: defaultdict[str, float] = defaultdict(float)
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        series, _, value = line.rpartition(" ")
        name = series.split("{", 1)[0]
        if name == "bridge_broker_node_info" and float(value) == 1.0:
            node = series.split('node="', 1)[1].split('"', 1)[0]
        totals[name] += float(value)
    return Sample(
        t,
        node,
        totals["bridge_events_published_total"],
        totals["bridge_outbox_replayed_total"],
        totals["bridge_events_stored_total"],
        totals["bridge_outbox_depth"],
    )


@dataclass
class Replica:
    name: str
    daemon: Daemon
    sender: Sender
    samples: list[Sample] = field(default_factory=list)

    @property
    def node(self) -> str | None:
        """The node in use at the last sample."""
        return self.samples[-1].node if self.samples else None

    def node_at(self, t: float) -> str | None:
        before = [s for s in self.samples if s.t <= t]
        return before[-1].node if before else None

    def resumed(self, mark: Mark) -> float | None:
        """Seconds from the fault until this replica publishes directly on another node."""
        return self._steady_after(mark, elsewhere=True)

    def direct_again(self, mark: Mark) -> float | None:
        """Seconds from the fault until this replica publishes directly again, on any node
        (the same one too, once it is back)."""
        return self._steady_after(mark, elsewhere=False)

    def _steady_after(self, mark: Mark, elsewhere: bool) -> float | None:
        """The first sample after the fault (on another node, if ``elsewhere``) with more
        direct publishes than the one before, from which on for :data:`STEADY` seconds the
        node stays, direct publishes grow and nothing goes into the outbox."""
        after = [s for s in self.samples if s.t >= mark.t]
        for before, first in itertools.pairwise(after):
            if first.node is None or (elsewhere and first.node == mark.node.address):
                continue
            if first.direct <= before.direct:
                continue
            if after[-1].t < first.t + STEADY - 2 * SAMPLE_EVERY:
                return None  # the samples end before a steady stretch could
            span = [s for s in after if first.t <= s.t <= first.t + STEADY]
            if span[-1].direct > first.direct and all(
                s.node == first.node and s.stored == before.stored for s in span
            ):
                return first.t - mark.t
        return None

    def nodes_used(self) -> list[str]:
        """The nodes (host:port) it was on, in order, consecutive repeats once."""
        seen: list[str] = []
        for sample in self.samples:
            if sample.node is not None and (not seen or seen[-1] != sample.node):
                seen.append(sample.node)
        return seen


@dataclass(frozen=True)
class Mark:
    """A fault: when the node became unusable, and which node."""

    t: float
    node: Node


Fault = Callable[["Fleet"], Awaitable[list[Mark]]]


def cluster_config(prefix: str) -> str:
    """The fault suite's config, its queues quorum queues on all three nodes."""
    text = config_text(prefix)
    three = "arguments: {x-quorum-initial-group-size: 3}"
    for queue in (f"{prefix}.unrouted", f"{prefix}.all"):
        plain = f"- {{name: {queue}}}"
        assert plain in text, f"tests.rig.config_text no longer declares {queue} so"
        text = text.replace(plain, f"- {{name: {queue}, {three}}}")
    return text


class Fleet:
    """The replicas, the cluster, the load and the checks of one test."""

    def __init__(self, cluster: Cluster, tmp: Path) -> None:
        self.cluster = cluster
        self.tmp = tmp
        self.prefix = f"cluster.{uuid.uuid4().hex[:8]}"
        self.signer = SigningKey.generate()
        self.replicas: list[Replica] = []
        self.notes_from = len(cluster.notes)  # the cluster's notes before this test

    def start(self) -> None:
        config = self.tmp / "bridge.yaml"
        config.write_text(cluster_config(self.prefix))
        keys = key_folder(self.tmp / "keys", self.signer)
        for name in ("a", "b"):
            env = {
                "BRIDGE_AMQP_URL": self.cluster.urls,
                "BRIDGE_PORT": str(free_port()),
                "BRIDGE_KEY_BASE_URL": keys,
                "BRIDGE_OUTBOX_DIR": str(self.tmp / f"outbox-{name}"),
                "BRIDGE_LOG_FORMAT": "json",
            }
            daemon = Daemon(config, env)
            sender = Sender(daemon.url + "/webhook", self.signer)
            self.replicas.append(Replica(name, daemon, sender))
        for replica in self.replicas:
            replica.daemon.wait_ready(30)

    def stop(self) -> None:
        """Stop the replicas (SIGTERM, else SIGKILL) and keep their logs and samples beside
        the test's (``bridge-a.log``, ``samples-a.json``)."""
        for replica in self.replicas:
            (self.tmp / f"samples-{replica.name}.json").write_bytes(
                orjson.dumps([dataclasses.asdict(s) for s in replica.samples])
            )
            try:
                replica.daemon.stop()
            except Exception:
                replica.daemon.kill()
            with contextlib.suppress(OSError):
                shutil.copy(replica.daemon.log_file, self.tmp / f"bridge-{replica.name}.log")

    # -- load and samples ----------------------------------------------------------------------

    async def run(self, fault: Fault, before: float = 2.0, after: float = 3.0) -> list[Mark]:
        """Steady load on both replicas from ``before`` seconds ahead of ``fault`` until
        ``after`` seconds after it is over (at most :data:`LONGEST` s); then wait until both
        are connected with an empty outbox. The fault's marks."""
        until: list[float] = []  # when the fault is over: the time to stop sending
        done = asyncio.Event()
        watch = asyncio.create_task(self._watch(done))
        try:
            async with asyncio.timeout(LONGEST + GIVE_UP_AFTER + 60):
                feeds = [asyncio.create_task(self._feed(r, until)) for r in self.replicas]
                await asyncio.sleep(before)
                marks = await fault(self)
                until.append(time.monotonic() + after)
                await asyncio.gather(*feeds)
            await self.settle()
        finally:
            done.set()
            await watch
        return marks

    @staticmethod
    async def _feed(replica: Replica, until: list[float]) -> None:
        """A second's worth of events (its own sender run) every second, until ``until`` says
        or :data:`LONGEST` s have passed; then wait for every event's answer."""
        started, runs = time.monotonic(), list[asyncio.Task[None]]()
        while time.monotonic() - started < LONGEST and not (until and time.monotonic() > until[0]):
            prefix = f"{replica.name}{len(runs):03d}-"
            runs.append(
                asyncio.create_task(replica.sender.run(int(RATE), RATE, GIVE_UP_AFTER, prefix))
            )
            await asyncio.sleep(1.0)
        await asyncio.gather(*runs)

    async def _watch(self, done: asyncio.Event) -> None:
        timeout = aiohttp.ClientTimeout(total=1.0)
        async with aiohttp.ClientSession(timeout=timeout) as session:

            async def sample(replica: Replica) -> None:
                with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError):
                    async with session.get(replica.daemon.url + "/metrics") as answer:
                        text = await answer.text()
                    replica.samples.append(parse_metrics(text, time.monotonic()))

            while not done.is_set():
                await asyncio.gather(*(sample(r) for r in self.replicas))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(done.wait(), SAMPLE_EVERY)

    def node_in_use(self, replica: str = "a") -> Node:
        """The node ``replica`` publishes on now."""
        (found,) = [r for r in self.replicas if r.name == replica]
        assert found.node is not None, f"replica {replica} is not connected"
        return self.cluster.node_at(found.node)

    def using(self, node: Node) -> list[Replica]:
        return [r for r in self.replicas if r.node == node.address]

    async def settle(self, seconds: float = 60) -> None:
        """Both replicas connected, their outboxes empty."""
        deadline = time.monotonic() + seconds
        states: dict[str, Any] = {}
        timeout = aiohttp.ClientTimeout(total=2.0)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while time.monotonic() < deadline:
                for replica in self.replicas:
                    with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError):
                        async with session.get(replica.daemon.url + "/readyz") as answer:
                            states[replica.name] = orjson.loads(await answer.read())
                if len(states) == len(self.replicas) and all(
                    s.get("broker") == "connected" and s.get("outbox_depth") == 0
                    for s in states.values()
                ):
                    return
                await asyncio.sleep(0.2)
        raise AssertionError(f"the replicas did not drain their outboxes: {states}")

    # -- what reached the queues -------------------------------------------------------------

    async def delivered(self) -> list[Any]:
        """Every message of the test's queues, taken off them, through a node that answers."""
        node = next(n for n in self.cluster.nodes if amqp_answers(n.port))
        connection = await aio_pika.connect(node.url, timeout=10)
        found: list[Any] = []
        async with connection:
            channel = await connection.channel()
            for name in ("all", "unrouted"):
                queue = await channel.get_queue(f"{self.prefix}.{name}")
                idle = time.monotonic()
                while time.monotonic() - idle < 1.0:
                    message = await queue.get(fail=False, no_ack=True, timeout=10)
                    if message is None:
                        await asyncio.sleep(0.05)
                        continue
                    found.append(message)
                    idle = time.monotonic()
        return found

    async def forget_topology(self) -> None:
        with contextlib.suppress(Exception):
            node = next(n for n in self.cluster.nodes if amqp_answers(n.port))
            connection = await aio_pika.connect(node.url, timeout=10)
            async with connection:
                channel = await connection.channel()
                for queue in ("all", "unrouted"):
                    await channel.queue_delete(f"{self.prefix}.{queue}")
                for exchange in ("events", "unrouted"):
                    await channel.exchange_delete(f"{self.prefix}.{exchange}")

    # -- the row and the checks --------------------------------------------------------------

    def merged(self) -> Ledger:
        ledger = Ledger()
        for replica in self.replicas:
            own = replica.sender.ledger
            ledger.bodies.update(own.bodies)
            ledger.sent |= own.sent
            ledger.ok |= own.ok
            ledger.statuses += own.statuses
            ledger.slowest = max(ledger.slowest, own.slowest)
        return ledger

    def resumption(self, marks: list[Mark]) -> tuple[float | None, float | None, list[str]]:
        """Over the faults and the replicas each hit (a replica on another node at the fault
        was not): the longest time until publishing directly on another node, the longest
        until publishing directly at all (on any node), and a line for each."""
        worst: float | None = 0.0
        again: float | None = 0.0
        lines = []
        for mark in marks:
            for replica in self.replicas:
                if replica.node_at(mark.t) != mark.node.address:
                    continue
                took, direct = replica.resumed(mark), replica.direct_again(mark)
                lines.append(
                    f"replica {replica.name} off node {mark.node.index}: on another node "
                    f"after {_seconds(took)}, directly on any node after {_seconds(direct)}"
                )
                worst = None if took is None or worst is None else max(worst, took)
                again = None if direct is None or again is None else max(again, direct)
        return worst, again, lines

    def check(
        self,
        fault: str,
        marks: list[Mark],
        delivered: list[Any],
        table: list[Any],
        resume_within: float = RESUME_WITHIN,
    ) -> None:
        """LOSS, PHANTOM, bodies, the deadline and the resumption: a row (appended first),
        then asserted."""
        ledger = self.merged()
        ids = Counter(m.message_id or "" for m in delivered)
        loss = ledger.ok - set(ids)
        phantom = set(ids) - ledger.sent
        resumed, again, lines = self.resumption(marks)
        (self.tmp / "marks.json").write_bytes(
            orjson.dumps([{"t": m.t, "node": m.node.address} for m in marks])
        )
        stored = sum(r.samples[-1].stored for r in self.replicas if r.samples)
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
                "resumed": resumed,
                "direct_again": again,
                "stored": int(stored),
                "answers": dict(ledger.statuses),
                "notes": self.cluster.notes[self.notes_from :],
                "nodes": "; ".join(
                    f"{r.name} "
                    + ">".join(str(self.cluster.node_at(a).index) for a in r.nodes_used())
                    for r in self.replicas
                ),
            }
        )
        logs = ", ".join(f"{r.name}: {r.daemon.log_file}" for r in self.replicas)
        for replica in self.replicas:
            assert replica.daemon.process.poll() is None, f"replica {replica.name} died ({logs})"
            replica.daemon.logs()  # raises on a traceback
        assert not loss, f"LOSS: {sorted(loss)[:10]} ({logs})"
        assert not phantom, f"PHANTOM: {sorted(phantom)[:10]}"
        bodies = ledger.bodies
        changed = [m.message_id for m in delivered if m.body != bodies.get(m.message_id or "")]
        assert not changed, f"a body changed on the way: {changed[:5]}"
        assert ledger.ok == ledger.sent, f"the senders gave up on some events ({logs})"
        assert ledger.slowest < DEADLINE, f"an answer took {ledger.slowest:.2f} s ({logs})"
        assert lines, "the fault hit no replica: nothing to fail over"
        assert resumed is not None, f"publishing never resumed on another node: {lines} ({logs})"
        assert resumed <= resume_within, f"resumed after {resumed:.1f} s: {lines} ({logs})"


def _seconds(value: float | None) -> str:
    return "never" if value is None else f"{value:.1f} s"
