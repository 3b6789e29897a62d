"""The deliver step: publish with confirms, and say what was not confirmed and why.

Owns: :meth:`AmqpPublisher.publish`, over the supervised connection of ``bridge.link``. A publish
succeeds only when the broker confirms it (``Basic.Ack``) and did not return it:

- ``mandatory=True`` and persistent (``delivery_mode=2``) on every publish, so a returned
  (unroutable) message is a failure, not a success;
- every publish is bounded by a ``publish_timeout`` timer whatever aio-pika or the broker does
  (alarms included), and by the caller's deadline; a confirm still open then is *in doubt*
  (:class:`PublishFailed` hands it to the caller, who keeps the message);
- aiormq pairs a returned message with its publish by ``message_id``; two concurrent publishes
  with one id (Adobe redelivering while the first is in flight, or a batch repeating an event)
  would confuse it, so publishes of one ``message_id`` are serialized.

The hot path (profiled with ``make bench``): the frames of every publish of one turn of the event
loop go out in one write (``bridge.channel``), and one timer bounds the wait for all confirms: a
batch of N events costs no task per message.

Does not: decide routes, build messages, or answer HTTP. Errors surface as
:class:`BrokerUnavailable` (503) with a reason: ``not_connected``, ``timeout``, ``returned``,
``nacked``, ``broker_refused``, ``connection_lost``; anything else raised is a bug (a 500).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from functools import partial
from typing import Any, Final, Protocol

import aiormq
import structlog
from aio_pika.exceptions import DeliveryError, PublishError
from pamqp.commands import Basic

from bridge import metrics
from bridge.channel import Sent
from bridge.config import BrokerConfig
from bridge.errors import BrokerUnavailable
from bridge.frames import Unpublishable
from bridge.link import BrokerLink, broker_error, describe
from bridge.message import Outbound
from bridge.topology import Topology

log = structlog.get_logger("bridge.publisher")

# A confirm still open when publish() gives up is in doubt: the broker may yet confirm it. The
# caller keeps the message (the outbox) and hears the verdict when it comes; after this long
# without one, it is taken as not confirmed.
DOUBT_SECONDS: Final = 30.0
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


class AmqpPublisher(BrokerLink):
    """Publishes with confirms over the link's channel; see the module docstring."""

    def __init__(
        self, config: BrokerConfig, topology: Topology, connection_name: str = "events-bridge"
    ) -> None:
        super().__init__(config, topology, connection_name)
        self._in_flight_ids: dict[str, asyncio.Future[Any]] = {}

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
        sent: list[Sent] = []
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
        self, sent: list[Sent], failure: BrokerUnavailable | None
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

    async def _wait(self, sent: list[Sent], deadline: float) -> None:
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

    def _forget(self, entry: Sent) -> None:
        """The message id of a settled publish no longer names it (in flight, returns)."""
        out, confirmation, _, wire = entry
        if self._in_flight_ids.get(out.message_id) is confirmation:
            del self._in_flight_ids[out.message_id]
        wire.forget(entry)
        if confirmation.done() and not confirmation.cancelled():
            confirmation.exception()  # marks it retrieved: the verdict is read where needed

    def _settled_late(self, entry: Sent, confirmation: asyncio.Future[Any]) -> None:
        """A confirm that was in doubt came (or failed, or was given up on)."""
        self._forget(entry)
        if self._verdict(entry.out, confirmation) is None:
            metrics.PUBLISH_LATE_CONFIRMS.inc()

    async def _start(self, out: Outbound, deadline: float) -> Sent:
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
        channel, wire = self._channel, self._wire
        if channel is None or channel.is_closed or wire is None or wire.is_closed:
            metrics.PUBLISH_FAILURES.labels("not_connected").inc()
            raise BrokerUnavailable("not_connected", "broker connection is not ready")
        limit = self.max_message_bytes
        if limit and len(out.body) > limit:
            raise Unpublishable(
                f"a body of {len(out.body)} bytes; the broker takes at most {limit} "
                "(its max_message_size)"
            )
        sent = wire.send(out)
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
            return BrokerUnavailable("broker_refused", describe(exc))
        if broker_error(exc):
            return BrokerUnavailable("connection_lost", describe(exc))
        raise exc  # a bug, not a broker verdict: the error middleware logs it


def _give_up(confirmations: list[asyncio.Future[Any]]) -> None:
    """No verdict in :data:`DOUBT_SECONDS`: taken as not confirmed (cancelled, so aiormq, should
    the ack come after all, ignores it quietly)."""
    for confirmation in confirmations:
        if not confirmation.done():
            confirmation.cancel()
