"""The deliver step: aio-pika edge to RabbitMQ, with every safety set on purpose.

Owns: one publish connection and channel, kept by a supervisor task that (re)connects with
backoff, declares the topology on every connect, and notices a lost connection or channel.
A publish succeeds only when the broker confirms it (``Basic.Ack``) and did not return it.

aio-pika's defaults are unsafe for us, so each is set here (RELIABILITY.md §1.8):

- ``publisher_confirms=True, on_return_raises=True``: a returned (unroutable) message raises
  instead of resolving like a success; ``mandatory=True`` on every publish;
- messages are persistent (``delivery_mode=2``); the unrouted queue is a quorum queue;
- no robust connection: its publish waits for a reconnect without bound. While the supervisor
  reconnects, a publish fails at once (fast 503), and every publish is bounded by a
  ``publish_timeout`` timer whatever aio-pika or the broker does (alarms included); when the
  channel or connection closes, every unconfirmed publish fails at once;
- the first connect does not fail fast and kill the daemon: the supervisor keeps trying, and
  ``ready`` (``/readyz``) is False meanwhile;
- aiormq pairs a returned message with its publish by ``message_id``; two concurrent publishes
  with one id (Adobe redelivering while the first is in flight, or a batch repeating an event)
  would confuse it, so publishes of one ``message_id`` are serialized.

The hot path (profiled with ``make bench``): aio-pika connects, declares and supervises; the
publishes themselves skip both aio-pika's and aiormq's per-call layers. ``bridge.frames`` writes
each publish's frames, every publish of one event-loop turn goes to aiormq's writer as one
write, and the confirm is tracked in aiormq's own tables, so its reader settles it (ack, nack,
return). A batch of N events costs one timer and no task per message.

Topology: ``adobe.events`` (topic, durable, alternate exchange ``adobe.unrouted``),
``adobe.unrouted`` (fanout, durable) and its quorum queue ``adobe.unrouted``.

Does not: decide routes, build messages, or answer HTTP. Errors surface as
:class:`BrokerUnavailable` (503) with a reason: ``not_connected``, ``timeout``, ``returned``,
``nacked``, ``connection_lost``.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Sequence
from functools import partial
from typing import Any, Final, NamedTuple, Protocol

import aio_pika
import aio_pika.abc
import aiormq
import structlog
from aio_pika.exceptions import CONNECTION_EXCEPTIONS, DeliveryError, PublishError
from aiormq.abc import ChannelFrame
from aiormq.channel import Returning
from pamqp.commands import Basic
from yarl import URL

from bridge import metrics
from bridge.config import BrokerConfig
from bridge.declare import TopologyMissing, check_topology, declare_topology
from bridge.errors import BrokerUnavailable
from bridge.frames import HeaderTooLarge, Unpublishable, fit, publish_frames
from bridge.message import OMITTED, Outbound
from bridge.rules import Topology

log = structlog.get_logger("bridge.publisher")

FIRST_RETRY_DELAY = 0.2
CLOSE_TIMEOUT = 2.0
# A confirm still open when publish() gives up is in doubt: the broker may yet confirm it. The
# caller keeps the message (the outbox) and hears the verdict when it comes; after this long
# without one, it is taken as not confirmed.
DOUBT_SECONDS: Final = 30.0
# RabbitMQ's words when a message is over its max_message_size (rabbit_channel:check_msg_size).
_MAX_SIZE: Final = re.compile(r"message size (\d+) is larger than configured max size (\d+)")
# Closes that say "this message" rather than "not now": a precondition (the message's size), or
# frames the broker cannot read. Access refused (403) and not found (404) are the topology's.
REFUSALS: Final = (
    aiormq.exceptions.ChannelPreconditionFailed,
    aiormq.exceptions.ConnectionFrameError,
    aiormq.exceptions.ConnectionSyntaxError,
    aiormq.exceptions.ConnectionCommandInvalid,
    aiormq.exceptions.ConnectionUnexpectedFrame,
    aiormq.exceptions.ConnectionNotImplemented,
)


class PublishFailed(BrokerUnavailable):
    """Some messages of one :meth:`AmqpPublisher.publish` were not confirmed (a 503 unless the
    caller makes them safe otherwise). The others were confirmed, and stay published.

    ``unsafe``: each message not confirmed, with its confirm when that may still come (in doubt:
    it resolves to an ack, or fails, within :data:`DOUBT_SECONDS`), else None. ``refused``: the
    messages no broker would take as they are, each with why; publishing them again is useless.
    """

    def __init__(
        self,
        reason: str,
        detail: str,
        unsafe: Sequence[tuple[Outbound, asyncio.Future[Any] | None]] = (),
        refused: Sequence[tuple[Outbound, str]] = (),
    ) -> None:
        super().__init__(reason, detail)
        self.unsafe = list(unsafe)
        self.refused = list(refused)


def unsafe_and_refused(
    exc: BrokerUnavailable, messages: Sequence[Outbound]
) -> tuple[list[tuple[Outbound, asyncio.Future[Any] | None]], list[tuple[Outbound, str]]]:
    """What a failed publish of ``messages`` left unsafe, and what it found unpublishable."""
    if isinstance(exc, PublishFailed):
        return exc.unsafe, exc.refused
    return [(m, None) for m in messages], []


class Publisher(Protocol):
    """What the receiver needs of a publisher (a fake one serves HTTP-only tests)."""

    @property
    def ready(self) -> bool: ...

    async def publish(self, messages: Sequence[Outbound], deadline: float | None = None) -> None:
        """Publish ``messages``; return once all are confirmed; give up at the loop time
        ``deadline`` at the latest (None: the publisher's own timeout)."""


def broker_url(config: BrokerConfig) -> str:
    """The configured URL with our heartbeat, unless the URL sets its own."""
    url = URL(config.url)
    if "heartbeat" not in url.query:
        url = url.update_query(heartbeat=config.heartbeat)
    return str(url)


def redacted(url: str) -> str:
    parsed = URL(url)
    return str(parsed.with_password("***")) if parsed.password else str(parsed)


class _Sent(NamedTuple):
    """A publish handed to the writer: its confirm, and its entry in the channel's table of
    message id → delivery tag (how aiormq names a returned message)."""

    out: Outbound
    confirmation: asyncio.Future[Any]
    returns: dict[str, int]
    tag: int


class AmqpPublisher:
    """Publishes with confirms over one supervised connection; see the module docstring."""

    def __init__(
        self, config: BrokerConfig, topology: Topology, connection_name: str = "events-bridge"
    ) -> None:
        self._config = config
        self._topology = topology
        self._checked_once = False
        # Set when the topology is passive and missing at start-up: `serve` stops on it.
        self.fatal: asyncio.Future[str] | None = None
        self._url = broker_url(config)
        self._name = connection_name
        self._connection: aio_pika.abc.AbstractConnection | None = None
        self._channel: aio_pika.abc.AbstractChannel | None = None
        self._underlay: aiormq.Channel | None = None
        self._lost = asyncio.Event()
        self._became_ready = asyncio.Event()
        self._supervisor: asyncio.Task[None] | None = None
        self._in_flight_ids: dict[str, asyncio.Future[Any]] = {}
        self._outgoing: list[bytes] = []  # publish frames made in this turn of the loop
        self._flush_scheduled = False
        self._writing: asyncio.Task[None] | None = None
        self._closing: set[asyncio.Task[Any]] = set()
        # Bodies larger than this the broker refuses (its max_message_size): configured, or
        # learned from the broker's own refusal. 0: not known.
        self.max_message_bytes = config.max_message_bytes

    @property
    def ready(self) -> bool:
        return self._channel is not None and not self._channel.is_closed

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
            try:
                await self._connect()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure to connect means: retry later
                metrics.BROKER_CONNECTS.labels("failed").inc()
                log.warning(
                    "broker_connect_failed",
                    url=redacted(self._url),
                    error=_describe(exc),
                    retry_in=round(delay, 1),
                )
                await self._drop()
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._config.reconnect_max_delay)
                continue
            delay = FIRST_RETRY_DELAY
            await self._lost.wait()
            log.warning("broker_connection_lost", url=redacted(self._url))
            await self._drop()

    async def _connect(self) -> None:
        self._lost.clear()
        connection = await aio_pika.connect(
            self._url,
            timeout=self._config.connect_timeout,
            client_properties={"connection_name": self._name},
        )
        self._connection = connection
        connection.close_callbacks.add(self._on_close)
        async with asyncio.timeout(self._config.connect_timeout * 2):
            if self._topology.passive:
                missing = await check_topology(connection, self._topology)
                if missing:
                    message = ", ".join(missing) + " missing on the broker (topology.passive)"
                    if not self._checked_once and self.fatal and not self.fatal.done():
                        self.fatal.set_result(message)
                    raise TopologyMissing(message)
            self._checked_once = True
            channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
            channel.close_callbacks.add(self._on_close)
            if not self._topology.passive:
                await declare_topology(channel, self._topology)
            underlay = await channel.get_underlay_channel()
            if not isinstance(underlay, aiormq.Channel):  # the hot path uses its tables
                raise TypeError(f"unexpected aiormq channel {type(underlay).__name__}")
            self._underlay = underlay
            _confirm_from_the_front(self._underlay)
        self._channel = channel
        metrics.BROKER_CONNECTS.labels("connected").inc()
        metrics.BROKER_READY.set(1)
        self._became_ready.set()
        log.info("broker_connected", url=redacted(self._url))

    def _on_close(self, sender: Any, exc: BaseException | None = None) -> None:
        if sender is not self._channel and sender is not self._connection:
            return  # late news of a connection already dropped: not about the current one
        self._learn(exc)
        metrics.BROKER_READY.set(0)
        self._fail_unconfirmed(self._underlay, exc)
        self._lost.set()

    @staticmethod
    def _fail_unconfirmed(
        underlay: aiormq.abc.AbstractChannel | None, exc: BaseException | None
    ) -> None:
        """A closed channel will confirm nothing more: fail its publishes now, not at their
        timeout (aiormq's own ``basic_publish`` does the same while it waits)."""
        if not isinstance(underlay, aiormq.Channel):
            return
        for confirmation in list(underlay.confirmations.values()):
            if isinstance(confirmation, Returning):  # a placeholder nobody awaits
                continue
            if isinstance(confirmation, asyncio.Future) and not confirmation.done():
                # The broker's own reason (a refusal says which kind) when it gave one.
                confirmation.set_exception(
                    exc
                    if isinstance(exc, aiormq.exceptions.AMQPError)
                    else aiormq.exceptions.ChannelClosed(None, f"channel closed: {exc!r}")
                )

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

    async def _drop(self) -> None:
        metrics.BROKER_READY.set(0)
        self._fail_unconfirmed(self._underlay, None)
        self._channel = None
        self._underlay = None
        # Frames not yet handed to the old connection die with it (its close rejects their
        # confirms; the publish timeout is the backstop).
        self._outgoing.clear()
        if self._writing is not None:
            self._writing.cancel()
        connection = self._connection
        if connection is not None and not connection.is_closed:
            # aio-pika's close() awaits its close callbacks in a `finally`, so a cancellation (a
            # timeout) cannot stop it: run it as a task of its own and wait a bounded time.
            closing = asyncio.create_task(connection.close(), name="broker-close")
            self._closing.add(closing)
            closing.add_done_callback(_forget(self._closing))
            await asyncio.wait({closing}, timeout=CLOSE_TIMEOUT)
        # Forgotten only once closed: close() cancelling the supervisor mid-way closes it again.
        if self._connection is connection:
            self._connection = None

    async def publish(self, messages: Sequence[Outbound], deadline: float | None = None) -> None:
        """Publish all messages at once; return only when every one is confirmed.

        Raises :class:`PublishFailed` if any is not, saying which are unsafe (in doubt or
        failed) and which are unpublishable. Those that were confirmed stay published: the
        sender retries the request and consumers deduplicate on ``message_id``. All frames go
        out in one write; then one timer bounds the wait for all the confirms.
        """
        if not messages:
            return
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        limit = loop.time() + self._config.publish_timeout  # for the whole call
        deadline = limit if deadline is None else min(limit, deadline)
        sent: list[_Sent] = []
        refused: list[tuple[Outbound, str]] = []
        unsent: list[Outbound] = []
        failure: BrokerUnavailable | None = None
        settled = False
        try:
            for n, out in enumerate(messages):
                try:
                    sent.append(await self._start(out, deadline))
                except Unpublishable as exc:
                    metrics.PUBLISH_FAILURES.labels("unpublishable").inc()
                    refused.append((out, str(exc)))
                except BrokerUnavailable as exc:  # not connected, or an earlier copy's wait
                    failure, unsent = exc, list(messages[n:])
                    break
            if sent:
                await self._wait(sent, deadline)
            settled = True
        finally:
            if not settled:  # we were cancelled (a request's deadline): nobody will look
                for entry in sent:
                    self._forget(entry)
                    if not entry.confirmation.done():
                        entry.confirmation.cancel()
        unsafe, failure = self._verdicts(sent, failure)
        unsafe += [(out, None) for out in unsent]
        if unsafe or refused:
            if failure is None:
                failure = BrokerUnavailable("unpublishable", refused[0][1])
            raise PublishFailed(failure.reason, failure.detail, unsafe, refused)
        metrics.PUBLISH_SECONDS.observe(time.perf_counter() - started)

    def _verdicts(
        self, sent: list[_Sent], failure: BrokerUnavailable | None
    ) -> tuple[list[tuple[Outbound, asyncio.Future[Any] | None]], BrokerUnavailable | None]:
        """The messages of ``sent`` not confirmed (with their confirm, if still open), and the
        first reason why."""
        unsafe: list[tuple[Outbound, asyncio.Future[Any] | None]] = []
        doubtful: list[asyncio.Future[Any]] = []
        for entry in sent:
            confirmation = entry.confirmation
            if not confirmation.done():  # in doubt: the broker may still confirm it
                unsafe.append((entry.out, confirmation))
                doubtful.append(confirmation)
                confirmation.add_done_callback(partial(self._settled_late, entry))
                continue
            self._forget(entry)
            problem = self._verdict(entry.out, confirmation)
            if problem is not None:
                metrics.PUBLISH_FAILURES.labels(problem.reason).inc()
                unsafe.append((entry.out, None))
                failure = failure or problem
        if doubtful:
            metrics.PUBLISH_FAILURES.labels("timeout").inc(len(doubtful))
            asyncio.get_running_loop().call_later(DOUBT_SECONDS, _give_up, doubtful)
            failure = failure or BrokerUnavailable(
                "timeout", f"no confirm within {self._config.publish_timeout:g}s"
            )
        return unsafe, failure

    async def _wait(self, sent: list[_Sent], deadline: float) -> None:
        """Wait until every confirm of ``sent`` has come, or ``deadline``. The confirms are left
        as they are: those still open at the deadline are in doubt, not failed."""
        loop = asyncio.get_running_loop()
        woken: asyncio.Future[None] = loop.create_future()

        def wake(_: object = None) -> None:
            if not woken.done():
                woken.set_result(None)

        # The broker confirms in the order we published, nearly always: wait for the last one
        # alone (asyncio.wait's machinery costs a callback per future), then for any still open.
        last = sent[-1].confirmation
        last.add_done_callback(wake)
        timer = loop.call_at(deadline, wake)
        try:
            await woken
        finally:
            timer.cancel()
            last.remove_done_callback(wake)
        waiting = [s.confirmation for s in sent if not s.confirmation.done()]
        if waiting and loop.time() < deadline:
            await asyncio.wait(waiting, timeout=deadline - loop.time())

    def _forget(self, entry: _Sent) -> None:
        """The message id of a settled publish no longer names it (in flight, returns)."""
        out, confirmation, returns, tag = entry
        if self._in_flight_ids.get(out.message_id) is confirmation:
            del self._in_flight_ids[out.message_id]
        if returns.get(out.message_id) == tag:
            del returns[out.message_id]
        if confirmation.done() and not confirmation.cancelled():
            confirmation.exception()  # marks it retrieved: the verdict is read where needed

    def _settled_late(self, entry: _Sent, confirmation: asyncio.Future[Any]) -> None:
        """A confirm that was in doubt came (or failed, or was given up on)."""
        self._forget(entry)
        if self._verdict(entry.out, confirmation) is None:
            metrics.PUBLISH_LATE_CONFIRMS.inc()

    async def _start(self, out: Outbound, deadline: float) -> _Sent:
        """Send ``out`` (after any copy of it still in flight, until ``deadline``)."""
        # One copy of a message id in flight at a time: a return names the message by its id.
        # (Two targets of one event share its id: the second waits for the first's confirm.)
        while (previous := self._in_flight_ids.get(out.message_id)) is not None:
            if previous.done():
                break
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                metrics.PUBLISH_FAILURES.labels("timeout").inc()
                raise BrokerUnavailable(
                    "timeout", f"no confirm within {self._config.publish_timeout:g}s"
                )
            await asyncio.wait((previous,), timeout=remaining)
        channel, underlay = self._channel, self._underlay
        if channel is None or channel.is_closed or underlay is None or underlay.is_closed:
            metrics.PUBLISH_FAILURES.labels("not_connected").inc()
            raise BrokerUnavailable("not_connected", "broker connection is not ready")
        limit = self.max_message_bytes
        if limit and len(out.body) > limit:
            raise Unpublishable(
                f"a body of {len(out.body)} bytes; the broker takes at most {limit} "
                "(its max_message_size)"
            )
        sent = self._send(underlay, out)
        self._in_flight_ids[out.message_id] = sent.confirmation
        return sent

    def _verdict(
        self, out: Outbound, confirmation: asyncio.Future[Any]
    ) -> BrokerUnavailable | None:
        """None when the broker confirmed ``out``; else why not, as a 503."""
        exc = confirmation.exception() if not confirmation.cancelled() else TimeoutError()
        if exc is None:
            result = confirmation.result()
            if isinstance(result, Basic.Ack):
                return None
            return BrokerUnavailable(
                "not_confirmed", f"unexpected publish result {type(result).__name__}"
            )
        if isinstance(exc, TimeoutError):
            return BrokerUnavailable(
                "timeout", f"no confirm within {self._config.publish_timeout:g}s"
            )
        if isinstance(exc, PublishError):
            # Our exchanges have an alternate exchange, so a return means the topology is broken
            # (the unrouted exchange or queue was deleted): reconnect, which declares it again.
            if any(
                out.exchange == e.name and e.alternate_exchange for e in self._topology.exchanges
            ):
                log.warning("topology_broken", exchange=out.exchange, action="redeclaring")
                self._lost.set()
            return BrokerUnavailable("returned", "broker returned the message as unroutable")
        if isinstance(exc, DeliveryError):
            return BrokerUnavailable("nacked", "broker refused the message (nack)")
        if isinstance(exc, REFUSALS):
            # The broker closed the channel or connection over a message: this one, or another
            # in flight with it (which one, the close does not say).
            return BrokerUnavailable("broker_refused", _describe(exc))
        if isinstance(exc, (*CONNECTION_EXCEPTIONS, aiormq.exceptions.AMQPError)):
            return BrokerUnavailable("connection_lost", _describe(exc))
        raise exc  # a bug, not a broker verdict: the error middleware logs it

    def _send(self, underlay: aiormq.Channel, out: Outbound) -> _Sent:
        """Queue ``out``'s publish frames; the future of its confirm and its delivery tag.

        This is aiormq's ``basic_publish`` without its per-call costs (a lock, a timeout, a queue
        hand-off and pamqp's marshalling per message): the frames come from ``bridge.frames``,
        and every publish made in one turn of the event loop goes out in one write. The
        confirm bookkeeping is aiormq's own (``confirmations`` by delivery tag, and
        ``message_id_delivery_tag`` for returns), so its reader settles the future: ack, nack,
        return, or the channel's close. :meth:`publish` forgets the id once it is settled.
        """
        try:
            frames = publish_frames(underlay.number, underlay.max_content_size, out)
        except HeaderTooLarge:
            # Only headers from the body can be this large: leave the largest out, so the frame
            # fits (the broker would close the whole connection over it).
            fitted = fit(out, underlay.max_content_size)
            for name in set(fitted.headers.get(OMITTED, "").split(",")) - set(
                out.headers.get(OMITTED, "").split(",")
            ):
                metrics.HEADERS_OMITTED.labels(name).inc()
            frames = publish_frames(underlay.number, underlay.max_content_size, fitted)
        underlay.delivery_tag += 1
        tag = underlay.delivery_tag
        loop = asyncio.get_running_loop()
        confirmation: asyncio.Future[Any] = loop.create_future()
        underlay.confirmations[tag] = confirmation
        returns = underlay.message_id_delivery_tag
        returns[out.message_id] = tag
        self._outgoing.append(frames)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush, underlay)
        return _Sent(out, confirmation, returns, tag)

    def _flush(self, underlay: aiormq.Channel) -> None:
        """Hand this turn's publishes to aiormq's writer as one frame group, in tag order."""
        self._flush_scheduled = False
        if self._writing is not None or not self._outgoing:
            return  # the writer in progress takes them next
        if underlay is not self._underlay or underlay.is_closed:
            self._outgoing.clear()  # the channel's close rejected their confirms
            return
        payload = b"".join(self._outgoing)
        self._outgoing.clear()
        frame = ChannelFrame(payload=payload, should_close=False)
        try:
            underlay.write_queue.put_nowait(frame)
        except asyncio.QueueFull:  # aiormq's writer is behind: wait for room, keep the order
            self._writing = asyncio.create_task(self._write_slowly(underlay, frame))

    async def _write_slowly(self, underlay: aiormq.Channel, frame: ChannelFrame) -> None:
        try:
            while True:
                await underlay.write_queue.put(frame)
                if not self._outgoing:
                    return
                frame = ChannelFrame(payload=b"".join(self._outgoing), should_close=False)
                self._outgoing.clear()
        finally:
            self._writing = None


def _confirm_from_the_front(underlay: aiormq.abc.AbstractChannel) -> None:
    """Replace aiormq's handler of the broker's acks and nacks on our publish channel.

    aiormq's visits every unconfirmed publish for each ``multiple`` ack and schedules one
    callback per tag: with a thousand publishes in flight (batches) that was a tenth of the
    bridge's time (profiled). Our tags are in the table in the order they were sent, which is
    the order the broker confirms them, so ours takes them from the front, and settles each
    with aiormq's own ``_confirm_delivery`` (the same results: ack, nack, or a returned
    message's error). A returned message's entry goes back at the end of the table; the
    reconnect that follows a return drops the table.
    """
    assert isinstance(underlay, aiormq.Channel)
    confirmations = underlay.confirmations
    settle = underlay._confirm_delivery

    async def on_confirm(frame: aiormq.abc.ConfirmationFrameType) -> None:
        last = frame.delivery_tag
        if not getattr(frame, "multiple", False):
            settle(last, frame)
            return
        while confirmations:
            tag = next(iter(confirmations))
            if tag > last:
                return
            settle(tag, frame)

    underlay._on_confirm_frame = on_confirm  # type: ignore[method-assign]


def _give_up(confirmations: list[asyncio.Future[Any]]) -> None:
    """No verdict in :data:`DOUBT_SECONDS`: taken as not confirmed (cancelled, so aiormq, should
    the ack come after all, ignores it quietly)."""
    for confirmation in confirmations:
        if not confirmation.done():
            confirmation.cancel()


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _forget(tasks: set[asyncio.Task[Any]]) -> Any:
    def done(task: asyncio.Task[Any]) -> None:
        tasks.discard(task)
        if not task.cancelled():
            task.exception()  # a failed close of a dead connection is expected, not news

    return done
