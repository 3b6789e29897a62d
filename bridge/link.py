"""The broker link: one connection and publish channel, kept by a supervisor.

Part of the deliver step, under ``bridge.publisher`` (which publishes on it). The supervisor
task (re)connects with backoff to the first node that answers (``bridge.nodes``), declares the
topology at start and again, beside the publishing, after every reconnect (``bridge.declare``),
and notices a lost connection or channel, or a node that stopped answering. aio-pika's defaults
are unsafe for us, so each is set on purpose (the README, "Delivery semantics"):

- no robust connection: its publish waits for a reconnect without bound. While the supervisor
  reconnects, a publish fails at once (a fast 503); when the channel or connection closes, every
  unconfirmed publish fails at once;
- ``publisher_confirms=True, on_return_raises=True`` on the publish channel;
- the first connect does not fail fast and kill the daemon: the supervisor keeps trying, and
  ``ready`` (``/readyz``) is False meanwhile. A failure that is the broker's or the network's is
  one warning line (``broker_connect_failed``); anything else is a bug, logged with its
  traceback (``broker_connect_crashed``), and retried the same.

Does not: publish (``bridge.publisher``) or write frames (``bridge.channel``).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from functools import partial
from typing import Any, Final

import aio_pika
import aio_pika.abc
import aiormq
import pamqp.exceptions
import structlog

from bridge import metrics
from bridge.channel import PublishChannel, open_channel
from bridge.config import BrokerConfig
from bridge.config_links import redact
from bridge.declare import TopologyMissing, check_topology, declare_topology
from bridge.nodes import Node, Watchdog
from bridge.tls import client_context, tls_problem
from bridge.topology import Topology

log = structlog.get_logger("bridge.publisher")

FIRST_RETRY_DELAY = 0.2
CLOSE_TIMEOUT = 2.0
FAILOVER_PAUSE = 1.0  # seconds between losing a node and connecting to the next
REDECLARE_TIMEOUT = 60.0  # after a reconnect, declarations run beside the publishing
# RabbitMQ's words when a message is over its max_message_size (rabbit_channel:check_msg_size;
# without "configured" when the limit is RabbitMQ's own ceiling of 512 MiB).
_MAX_SIZE: Final = re.compile(r"message size (\d+) is larger than (?:configured )?max size (\d+)")
# What the broker or the network may raise: a 503, and the connection is made again. Anything
# else is a bug (a 500 with its traceback), not a reason to retry: see broker_error().
BROKER_ERRORS: Final = (
    aiormq.exceptions.AMQPError,
    OSError,
    EOFError,
    StopAsyncIteration,  # aiormq's word for a connection closed while it read a frame
    pamqp.exceptions.PAMQPException,  # a frame from the broker pamqp cannot read
    TopologyMissing,
)
_CLIENT_MODULES: Final = ("aiormq", "aio_pika", "pamqp")
_LOOP_MODULES: Final = ("asyncio", "uvloop")


def broker_url(config: BrokerConfig) -> str:
    """The first node's URL with our heartbeat, unless the URL sets its own."""
    return Node.from_url(config.url, config.heartbeat).url


def redacted(url: str) -> str:
    return redact(url)


class BrokerLink:
    """One supervised connection and publish channel; see the module docstring."""

    def __init__(
        self, config: BrokerConfig, topology: Topology, connection_name: str = "events-bridge"
    ) -> None:
        self._config = config
        self._topology = topology
        self._checked_once = False
        # Set when the topology is passive and missing at start-up: `serve` stops on it.
        self.fatal: asyncio.Future[str] | None = None
        self.nodes = [Node.from_url(url, config.heartbeat) for url in config.urls]
        self._next = 0  # the node tried first at the next connect
        self.node: Node | None = None  # the node in use while connected
        self.problem: str | None = None  # why the last attempt failed (/readyz), None once in
        needs_tls = any(node.tls for node in self.nodes)
        self._context = client_context(config.tls) if needs_tls else None
        self._watchdog: Watchdog | None = None
        self._name = connection_name
        self._connection: aio_pika.abc.AbstractConnection | None = None
        self._channel: aio_pika.abc.AbstractChannel | None = None
        self._wire: PublishChannel | None = None  # how publishes reach the broker
        self._lost = asyncio.Event()
        self._silenced = False  # the watchdog, not the broker, ended the connection
        self._became_ready = asyncio.Event()
        self._supervisor: asyncio.Task[None] | None = None
        self._closing: set[asyncio.Task[Any]] = set()
        # Bodies larger than this the broker refuses (its max_message_size): configured, or
        # learned from the broker's own refusal. 0: not known.
        self.max_message_bytes = config.max_message_bytes

    @property
    def ready(self) -> bool:
        return self._channel is not None and not self._channel.is_closed

    @property
    def path(self) -> str | None:
        """The path publishes take (``bridge.channel``): fast, portable, or None unconnected."""
        return None if self._wire is None else self._wire.path

    async def start(self) -> None:
        """Start connecting in the background; returns at once."""
        self.fatal = asyncio.get_running_loop().create_future()
        self._supervisor = asyncio.create_task(self._supervise(), name="broker-supervisor")

    async def wait_ready(self, seconds: float) -> bool:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                while not self.ready:
                    self._became_ready.clear()
                    await self._became_ready.wait()
        return self.ready

    async def close(self) -> None:
        """Stop reconnecting and close the connection cleanly (a Connection.Close, not a reset)."""
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
            self._supervisor = None
        await self._drop()
        if self._closing:  # closes still under way: let them end before the loop goes away
            await asyncio.wait(set(self._closing), timeout=CLOSE_TIMEOUT)

    async def apply_topology(self, topology: Topology) -> None:
        """Adopt a new topology (config reload): declare it now on a channel of its own, so a
        failure leaves the publish channel untouched, and on every reconnect from then on."""
        if topology == self._topology:
            return
        connection = self._connection
        if connection is None or connection.is_closed:
            # Adopting it unchecked could leave a topology that never declares, and 503s forever.
            raise TopologyMissing(
                "the broker is not connected, so the new topology cannot be declared: "
                "send SIGHUP again once it is back"
            )
        if connection is not None:
            channel = await connection.channel()
            try:
                if topology.passive:
                    missing = await check_topology(connection, topology)
                    if missing:
                        raise TopologyMissing(", ".join(missing) + " missing on the broker")
                else:
                    await declare_topology(channel, topology)
            finally:
                if not channel.is_closed:
                    await channel.close()
        self._topology = topology

    async def _supervise(self) -> None:
        delay = FIRST_RETRY_DELAY
        while True:
            if not await self._connect_any(delay):
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._config.reconnect_max_delay)
                continue
            delay = FIRST_RETRY_DELAY
            await self._lost.wait()
            log.warning("broker_connection_lost", url=self._shown(), node=self._node_name())
            # A silent node would not answer a polite close either: do not wait for one.
            await self._drop(patient=not self._silenced)
            # A moment before the next node: a cluster that just lost a queue's leader elects
            # another within a second, and a channel opened during the election can stay
            # pointed at the dead leader (RabbitMQ 3.10: every publish on it nacked or left
            # unconfirmed until that node returns). Meanwhile events go to the outbox.
            await asyncio.sleep(FAILOVER_PAUSE)

    async def _connect_any(self, delay: float) -> bool:
        """Try each node once, from the one after the node last lost (a node that just failed
        is tried last); True once connected."""
        count = len(self.nodes)
        for step in range(count):
            index = (self._next + step) % count
            node = self.nodes[index]
            try:
                await self._connect(node)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                metrics.BROKER_CONNECTS.labels("failed").inc()
                self.problem = tls_problem(exc) if node.tls else None
                self.problem = self.problem or describe(exc)
                retry = "next node" if step + 1 < count else f"in {delay:.1f} s"
                if broker_error(exc) or tls_problem(exc):
                    log.warning(
                        "broker_connect_failed",
                        url=node.redacted,
                        error=self.problem,
                        retry=retry,
                    )
                else:  # a bug: its traceback, then the same retries
                    log.exception("broker_connect_crashed", url=node.redacted, retry=retry)
                await self._drop()
                continue
            self._next = (index + 1) % count  # after a loss, start with another node
            return True
        return False

    async def _connect(self, node: Node) -> None:
        self._lost.clear()
        self._silenced = False
        connection = await node.open(
            connect_timeout=self._config.connect_timeout,
            name=self._name,
            context=self._context,
            server_name=self._config.tls.server_name,
        )
        self._connection = connection
        connection.close_callbacks.add(self._on_close)
        first = not self._checked_once
        async with asyncio.timeout(self._config.connect_timeout * 2):
            if first:  # at start: declared (or checked) before anything is published
                try:
                    await self._declare(connection)
                except TopologyMissing as exc:
                    if self.fatal and not self.fatal.done():
                        self.fatal.set_result(str(exc))
                    raise
                self._checked_once = True
            channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
            channel.close_callbacks.add(self._on_close)
            self._wire = open_channel(await channel.get_underlay_channel())
            watchdog = Watchdog(connection, partial(self._silent, connection))
            await watchdog.start()
        if not first:
            # Again on every reconnect, but beside the publishing: a node of a cluster that has
            # lost another node (cut off, not yet known dead) can hold a declaration for a
            # minute, while its publishes are confirmed within seconds.
            again = asyncio.create_task(self._declare_again(connection), name="broker-declare")
            self._closing.add(again)
            again.add_done_callback(_forget(self._closing))
        self._channel, self._watchdog, self.node, self.problem = channel, watchdog, node, None
        metrics.BROKER_CONNECTS.labels("connected").inc()
        metrics.BROKER_READY.set(1)
        metrics.broker_node(node.name, [n.name for n in self.nodes])
        self._became_ready.set()
        log.info("broker_connected", url=node.redacted, node=node.name)

    async def _declare(self, connection: aio_pika.abc.AbstractConnection) -> None:
        """Declare the topology on a channel of its own, or (passive) check it is all there."""
        topology = self._topology
        if topology.passive:
            missing = await check_topology(connection, topology)
            if missing:
                raise TopologyMissing(
                    ", ".join(missing) + " missing on the broker (topology.passive)"
                )
            return
        channel = await connection.channel()
        try:
            await declare_topology(channel, topology)
        finally:
            if not channel.is_closed:
                await channel.close()

    async def _declare_again(self, connection: aio_pika.abc.AbstractConnection) -> None:
        """After a reconnect: what fails is said, and publishing goes on (the topology was
        declared at start; a broker that lost it gets it back here)."""
        try:
            async with asyncio.timeout(REDECLARE_TIMEOUT):
                await self._declare(connection)
        except TimeoutError:
            if connection is self._connection:
                log.warning(
                    "topology_declare_slow",
                    node=self._node_name(),
                    detail=f"no answer to the declarations in {REDECLARE_TIMEOUT:g} s; "
                    "publishing goes on",
                )
        except Exception as exc:  # noqa: BLE001 - said; the publish channel is not touched
            if connection is self._connection and not connection.is_closed:
                log.error("topology_declare_failed", node=self._node_name(), error=describe(exc))

    def _silent(self, connection: aio_pika.abc.AbstractConnection, reason: str) -> None:
        """The watchdog's news: the node in use stopped answering; fail over."""
        if connection is not self._connection:
            return
        log.warning("broker_unresponsive", node=self._node_name(), reason=reason)
        self._silenced = True
        self._on_close(connection, ConnectionError(f"the broker stopped answering ({reason})"))

    def _node_name(self) -> str | None:
        return None if self.node is None else self.node.name

    def _shown(self) -> str:
        return self.nodes[0].redacted if self.node is None else self.node.redacted

    def _on_close(self, sender: Any, exc: BaseException | None = None) -> None:
        if sender is not self._channel and sender is not self._connection:
            return  # late news of a connection already dropped: not about the current one
        self._learn(exc)
        metrics.BROKER_READY.set(0)
        if self._wire is not None:  # it will confirm nothing more: fail its publishes now
            self._wire.fail_unconfirmed(exc)
        self._lost.set()

    def _learn(self, exc: BaseException | None) -> None:
        """A broker that closed the channel for a message over its ``max_message_size`` says the
        size: from now on such messages are refused before they are sent (and close nothing)."""
        found = _MAX_SIZE.search(str(exc)) if exc is not None else None
        if found is not None and int(found.group(2)) != self.max_message_bytes:
            self.max_message_bytes = int(found.group(2))
            log.warning(
                "broker_max_message_size_learned",
                max_message_bytes=self.max_message_bytes,
                action="larger events go to the quarantine (a 413 with outbox.mode off)",
            )

    async def _drop(self, patient: bool = True) -> None:
        metrics.BROKER_READY.set(0)
        metrics.broker_node(None, [n.name for n in self.nodes])
        if self._watchdog is not None:
            self._watchdog.stop()
        self._watchdog, self.node = None, None
        wire, self._wire, self._channel = self._wire, None, None
        if wire is not None:
            # Frames not yet handed to the old connection die with it (its close rejects their
            # confirms; the publish timeout is the backstop).
            wire.fail_unconfirmed(None)
            wire.discard()
        connection = self._connection
        if connection is not None and not connection.is_closed:
            # aio-pika's close() awaits its close callbacks in a `finally`, so a cancellation (a
            # timeout) cannot stop it: run it as a task of its own and wait a bounded time.
            closing = asyncio.create_task(connection.close(), name="broker-close")
            self._closing.add(closing)
            closing.add_done_callback(_forget(self._closing))
            await asyncio.wait({closing}, timeout=CLOSE_TIMEOUT if patient else 0.0)
        # Forgotten only once closed: close() cancelling the supervisor mid-way closes it again.
        if self._connection is connection:
            self._connection = None


def broker_error(exc: BaseException) -> bool:
    """Whether ``exc`` says the broker or the link failed (not a bug of ours): the broker's
    errors, the network's, and a ``RuntimeError`` that aio-pika or aiormq raise themselves
    (about a connection or channel that closed under them)."""
    if isinstance(exc, BROKER_ERRORS):
        return True
    if not isinstance(exc, RuntimeError):
        return False
    # The innermost frame that is not the event loop's (a transport closed under aiormq).
    raiser = ""
    tb = exc.__traceback__
    while tb is not None:
        module = str(tb.tb_frame.f_globals.get("__name__", ""))
        if not module.startswith(_LOOP_MODULES):
            raiser = module
        tb = tb.tb_next
    return raiser.startswith(_CLIENT_MODULES)


def describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _forget(tasks: set[asyncio.Task[Any]]) -> Any:
    def done(task: asyncio.Task[Any]) -> None:
        tasks.discard(task)
        if not task.cancelled():
            task.exception()  # a failed close of a dead connection is expected, not news

    return done
