"""The publish channel: how a publish reaches the broker, and how its confirm comes back.

Part of the deliver step, under ``bridge.publisher``. Two paths with one interface
(:class:`PublishChannel`): :meth:`send` an :class:`~bridge.message.Outbound`, get the future of
its confirm (a ``Basic.Ack``, or an exception: nack, return, the channel's close).

**The fast path** (:class:`FastChannel`, the default) is aiormq's ``basic_publish`` without its
per-call costs (a lock, a timeout, a queue hand-off and pamqp's marshalling per message, a third
of a publish when profiled with ``make bench``): ``bridge.frames`` writes the frames, every publish
of one turn of the event loop goes to aiormq's writer as one write, and the confirm is kept in
aiormq's own tables, so aiormq's reader settles it. This is the only module of ``bridge`` that
touches aiormq's internals. It relies on these, all of ``aiormq.Channel`` unless named:

- ``delivery_tag`` (int): the last tag used; each publish takes the next one. aiormq bumps it
  under its publish lock; this channel is ours alone (nothing else publishes on it), so the
  lock is not taken;
- ``confirmations`` (an ordered dict, tag → future): what aiormq's reader settles;
- ``message_id_delivery_tag`` (dict, message id → tag): how aiormq pairs a returned message
  with its publish;
- ``write_queue`` (the connection's ``asyncio.Queue`` of ``aiormq.abc.ChannelFrame``): what
  aiormq's writer sends, ``ChannelFrame(payload=…, should_close=False)`` being already
  marshalled frames;
- ``_confirm_delivery(tag, frame)``: settles one confirm as aiormq does (ack, nack, return);
- ``_on_confirm_frame(frame)``: replaced on our channel by one that takes confirms from the
  front of the table (aiormq's visits every open confirm per ``multiple`` ack);
- ``_on_return_frame``: aiormq's handler of a returned message, which must pair it with its
  publish through ``message_id_delivery_tag``;
- ``aiormq.channel.Returning``: the placeholder a returned message leaves in the table;
- ``number`` and ``max_content_size``: the channel's number and its largest body frame.

:func:`open_channel` checks all of these on every connect (:func:`internals_problem`: their
types and signatures, and one confirm settled as aiormq's reader would); if one is not what this
module expects (another aiormq), or ``BRIDGE_PUBLISH_PATH=portable`` is set, it
takes **the portable path** (:class:`PortableChannel`: aiormq's public ``basic_publish``, one
task per message, slower) and warns once. ``tests/test_channel.py`` pins each internal, and CI
runs the broker suites on both paths.

Does not: connect, decide what to publish, or judge a confirm (``bridge.publisher`` does).
"""

from __future__ import annotations

import asyncio
import inspect
import os
from collections import OrderedDict
from typing import Any, Final, NamedTuple, Protocol

import aiormq
import aiormq.abc
import aiormq.channel
import structlog
from pamqp.commands import Basic

from bridge import metrics
from bridge.frames import HeaderTooLarge, fit, publish_frames
from bridge.message import OMITTED, Outbound

log = structlog.get_logger("bridge.publisher")

FAST: Final = "fast"
PORTABLE: Final = "portable"
PATH_VARIABLE: Final = "BRIDGE_PUBLISH_PATH"


class Sent(NamedTuple):
    """A publish handed to a channel: the message, the future of its confirm, its delivery tag
    (0 on the portable path, where aiormq keeps it), and the channel."""

    out: Outbound
    confirmation: asyncio.Future[Any]
    tag: int
    channel: PublishChannel


class PublishChannel(Protocol):
    """What the publisher needs of a channel, on either path."""

    path: str

    @property
    def is_closed(self) -> bool: ...

    def send(self, out: Outbound) -> Sent:
        """Publish ``out`` (mandatory, persistent); raises ``Unpublishable`` for a message no
        frame can carry."""

    def forget(self, sent: Sent) -> None:
        """``sent`` is settled: its message id no longer names it."""

    def fail_unconfirmed(self, exc: BaseException | None) -> None:
        """The channel closed: fail every confirm still open, now."""

    def discard(self) -> None:
        """The connection is being dropped: frames not yet written die with it."""


def framed(number: int, max_body: int, out: Outbound) -> tuple[bytes, Outbound]:
    """``out``'s publish frames, and ``out`` as framed: with headers left out, largest first,
    when its content header would not fit one frame (the broker would close the connection)."""
    try:
        return publish_frames(number, max_body, out), out
    except HeaderTooLarge:
        fitted = fit(out, max_body)
        before = set(out.headers.get(OMITTED, "").split(","))
        for name in set(fitted.headers.get(OMITTED, "").split(",")) - before:
            metrics.HEADERS_OMITTED.labels(name).inc()
        return publish_frames(number, max_body, fitted), fitted


class FastChannel:
    """Publishes through aiormq's writer and confirm tables (see the module docstring)."""

    path = FAST

    def __init__(self, underlay: aiormq.Channel) -> None:
        self._underlay = underlay
        self._confirmations = underlay.confirmations
        self._returns = underlay.message_id_delivery_tag
        self._outgoing: list[bytes] = []  # publish frames made in this turn of the loop
        self._flush_scheduled = False
        self._writing: asyncio.Task[None] | None = None
        self._discarded = False
        _confirm_from_the_front(underlay)

    @property
    def is_closed(self) -> bool:
        return self._discarded or self._underlay.is_closed

    def send(self, out: Outbound) -> Sent:
        underlay = self._underlay
        frames, _ = framed(underlay.number, underlay.max_content_size, out)
        underlay.delivery_tag += 1
        tag = underlay.delivery_tag
        loop = asyncio.get_running_loop()
        confirmation: asyncio.Future[Any] = loop.create_future()
        self._confirmations[tag] = confirmation
        self._returns[out.message_id] = tag
        self._outgoing.append(frames)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        return Sent(out, confirmation, tag, self)

    def forget(self, sent: Sent) -> None:
        if self._returns.get(sent.out.message_id) == sent.tag:
            del self._returns[sent.out.message_id]

    def fail_unconfirmed(self, exc: BaseException | None) -> None:
        """aiormq's own ``basic_publish`` does the same while it waits."""
        for confirmation in list(self._confirmations.values()):
            if isinstance(confirmation, aiormq.channel.Returning):  # nobody awaits it
                continue
            if isinstance(confirmation, asyncio.Future) and not confirmation.done():
                # The broker's own reason (a refusal says which kind) when it gave one.
                confirmation.set_exception(
                    exc
                    if isinstance(exc, aiormq.exceptions.AMQPError)
                    else aiormq.exceptions.ChannelClosed(None, f"channel closed: {exc!r}")
                )

    def discard(self) -> None:
        self._discarded = True
        self._outgoing.clear()  # the channel's close rejects their confirms
        if self._writing is not None:
            self._writing.cancel()

    def _flush(self) -> None:
        """Hand this turn's publishes to aiormq's writer as one frame group, in tag order."""
        self._flush_scheduled = False
        if self._writing is not None or not self._outgoing:
            return  # the writer in progress takes them next
        if self.is_closed:
            self._outgoing.clear()  # the channel's close rejected their confirms
            return
        frame = aiormq.abc.ChannelFrame(payload=b"".join(self._outgoing), should_close=False)
        self._outgoing.clear()
        try:
            self._underlay.write_queue.put_nowait(frame)
        except asyncio.QueueFull:  # aiormq's writer is behind: wait for room, keep the order
            self._writing = asyncio.create_task(self._write_slowly(frame))

    async def _write_slowly(self, frame: aiormq.abc.ChannelFrame) -> None:
        try:
            while True:
                await self._underlay.write_queue.put(frame)
                if not self._outgoing:
                    return
                payload = b"".join(self._outgoing)
                self._outgoing.clear()
                frame = aiormq.abc.ChannelFrame(payload=payload, should_close=False)
        finally:
            self._writing = None


class PortableChannel:
    """Publishes with aiormq's public ``basic_publish``: one task per message, which aiormq
    settles itself (ack, nack, return, the channel's close)."""

    path = PORTABLE

    def __init__(self, underlay: aiormq.abc.AbstractChannel) -> None:
        self._underlay = underlay
        self._number = underlay.number
        self._max_body = int(getattr(underlay, "max_content_size", 0) or 0)
        self._tasks: set[asyncio.Future[Any]] = set()

    @property
    def is_closed(self) -> bool:
        return self._underlay.is_closed

    def send(self, out: Outbound) -> Sent:
        # The same checks and header fitting as the fast path; pamqp writes the frames. The
        # caller knows the message it gave (the outbox pairs them by identity), not the copy.
        _, framed_as = framed(self._number, self._max_body, out)
        properties = Basic.Properties(
            content_type=framed_as.content_type,
            headers=dict(framed_as.headers),
            delivery_mode=2,
            message_id=framed_as.message_id,
            timestamp=framed_as.timestamp,
            message_type=framed_as.type,
            app_id=framed_as.app_id,
        )
        publishing = self._underlay.basic_publish(
            framed_as.body,
            exchange=framed_as.exchange,
            routing_key=framed_as.routing_key,
            properties=properties,
            mandatory=True,
        )
        task: asyncio.Future[Any] = asyncio.ensure_future(publishing)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return Sent(out, task, 0, self)

    def forget(self, sent: Sent) -> None:
        """aiormq forgets the message id itself."""

    def fail_unconfirmed(self, exc: BaseException | None) -> None:
        """aiormq's ``basic_publish`` fails its own publishes when the channel closes."""

    def discard(self) -> None:
        """aiormq's close fails what it has not written."""


def internals_problem(underlay: object) -> str | None:
    """None when ``underlay`` has every internal :class:`FastChannel` relies on, and they behave
    as it expects; else what differs, in a few words. Never raises: a check that fails to run is
    a difference too."""
    try:
        problem = _shape_problem(underlay)
        if problem is None and isinstance(underlay, aiormq.Channel):
            problem = _behaviour_problem(underlay)
    except Exception as exc:  # noqa: BLE001 - whatever it is, the portable path is the answer
        return f"the check of aiormq's internals failed: {type(exc).__name__}: {exc}"
    return problem


def _shape_problem(underlay: object) -> str | None:
    if not isinstance(underlay, aiormq.Channel):
        return f"the channel is a {type(underlay).__name__}, not an aiormq.Channel"
    expected: tuple[tuple[str, type | tuple[type, ...]], ...] = (
        ("delivery_tag", int),
        ("confirmations", OrderedDict),
        ("message_id_delivery_tag", dict),
        ("write_queue", asyncio.Queue),
        ("number", int),
        ("max_content_size", int),
    )
    for name, kind in expected:
        value = getattr(underlay, name, None)
        if not isinstance(value, kind) or isinstance(value, bool):
            return f"aiormq.Channel.{name} is {type(value).__name__}, expected {kind}"
    for name, parameters in (("_confirm_delivery", 2), ("_on_confirm_frame", 1)):
        method = getattr(underlay, name, None)
        if not callable(method):
            return f"aiormq.Channel.{name} is missing"
        if len(inspect.signature(method).parameters) != parameters:
            return f"aiormq.Channel.{name} takes other arguments"
    if not inspect.iscoroutinefunction(type(underlay)._on_confirm_frame):
        return "aiormq.Channel._on_confirm_frame is no longer a coroutine"
    if not (isinstance(getattr(aiormq.channel, "Returning", None), type)):
        return "aiormq.channel.Returning is missing"
    try:  # as _flush makes them (a new required field fails here, not in every flush)
        frame = aiormq.abc.ChannelFrame(payload=b"", should_close=False)
    except TypeError:
        return "aiormq.abc.ChannelFrame takes other fields"
    if getattr(frame, "payload", None) != b"" or getattr(frame, "should_close", None) is not False:
        return "aiormq.abc.ChannelFrame takes other fields"
    # A return is paired with its publish through message_id_delivery_tag.
    if "message_id_delivery_tag" not in inspect.getsource(type(underlay)._on_return_frame):
        return "aiormq.Channel._on_return_frame no longer reads message_id_delivery_tag"
    return None


def _behaviour_problem(underlay: aiormq.Channel) -> str | None:
    """Settle a confirm of a tag no publish has (0: tags start at 1) as aiormq's reader would:
    it must resolve with the ack and leave the table."""
    confirmations = underlay.confirmations
    if 0 in confirmations:
        return "aiormq.Channel.confirmations holds tag 0"
    probe: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    confirmations[0] = probe
    try:
        underlay._confirm_delivery(0, Basic.Ack(delivery_tag=0))
        settled = probe.done() and not probe.cancelled() and isinstance(probe.result(), Basic.Ack)
        if not settled or 0 in confirmations:
            return "aiormq.Channel._confirm_delivery settles confirms otherwise"
    finally:
        confirmations.pop(0, None)
        probe.cancel()
    return None


_warned = False


def open_channel(underlay: aiormq.abc.AbstractChannel) -> PublishChannel:
    """The fast path on ``underlay`` if it checks out, else the portable path (warned once)."""
    global _warned  # noqa: PLW0603 - one warning per process, not per reconnect
    wanted = os.environ.get(PATH_VARIABLE, FAST).strip().lower() or FAST
    problem = f"{PATH_VARIABLE}={wanted}" if wanted == PORTABLE else internals_problem(underlay)
    if problem is None and isinstance(underlay, aiormq.Channel):
        channel: PublishChannel = FastChannel(underlay)
    else:
        channel = PortableChannel(underlay)
        if not _warned:
            _warned = True
            log.warning(
                "publish_path_portable",
                reason=problem,
                action="publishing with aiormq's basic_publish (slower); see the README, "
                "Troubleshooting",
            )
    metrics.PUBLISH_PATH.labels(FAST).set(channel.path == FAST)
    metrics.PUBLISH_PATH.labels(PORTABLE).set(channel.path == PORTABLE)
    return channel


def _confirm_from_the_front(underlay: aiormq.Channel) -> None:
    """Replace aiormq's handler of the broker's acks and nacks on our publish channel.

    aiormq's visits every unconfirmed publish for each ``multiple`` ack and schedules one
    callback per tag: with a thousand publishes in flight (batches) that was a tenth of the
    bridge's time (profiled). Our tags are in the table in the order they were sent, which is
    the order the broker confirms them, so ours takes them from the front, and settles each
    with aiormq's own ``_confirm_delivery`` (the same results: ack, nack, or a returned
    message's error). A returned message's entry goes back at the end of the table; the
    reconnect that follows a return drops the table.
    """
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
