"""The outbox: where an accepted event waits when the broker cannot take it yet.

A request is answered 200 only when every event is safe: confirmed by RabbitMQ, or written here
and fsync'ed (the README, "Delivery semantics"). Three rooms:

- here, :class:`Outbox`: the facade the receiver and the app use (``open``, ``append``,
  ``quarantine``, ``drain``, ``close``, ``usable``, ``stalled``), and its tasks that write: the
  *writer* (group commit: every append waiting at the same moment shares one write and one
  ``fsync``) and the *watchdog*;
- ``bridge.spool``: the records in memory and all the work on the files, synchronous (called
  here in a thread, under one lock), on top of ``bridge.segments`` (the files, their lock, their
  format and durability);
- ``bridge.replayer``: the task that publishes the backlog, with doubts, poison records and the
  quarantine, and moves the cursor through :meth:`Outbox.advance`.

**Folder lost.** If the folder is deleted or replaced while we run, the next write notices it
before anyone is answered, and everything the outbox holds is written into a new folder from
memory; if that fails, the appends get a 503. The watchdog looks every :data:`WATCH_SECONDS` too,
so events answered before the folder went are written again even when nothing else is appended.

Bounds: ``outbox.max_bytes`` of unconfirmed records (more: :class:`OutboxFull`, a 503), and a
full disk or any write error is :class:`OutboxUnavailable` (a 503, never a 200). A backlog the
connected broker takes nothing of for ``outbox.stall_seconds`` (30) is ``stalled``: ``/readyz``
then says not ready.

Does not: decide when to use the outbox (``bridge.receiver`` does, by ``outbox.mode``), or talk
AMQP itself: the replayer calls the publisher.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import weakref
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import structlog

from bridge import metrics
from bridge.errors import Unavailable
from bridge.message import Outbound
from bridge.publisher import Publisher
from bridge.replayer import Replayer
from bridge.segments import OutboxLocked, encode
from bridge.spool import Position, Spool

log = structlog.get_logger("bridge.outbox")

WATCH_SECONDS: Final = 1.0


class OutboxFull(Unavailable):
    pass


class OutboxUnavailable(Unavailable):
    pass


# An append waiting for the writer: its frames, messages, doubts, and the future it awaits.
_Appending = tuple[
    list[bytes], list[Outbound], list[asyncio.Future[Any] | None], asyncio.Future[None]
]


def _fail(appends: list[_Appending], error: Exception) -> None:
    for _, _, _, future in appends:
        if not future.done():
            future.set_exception(error)


_OPEN: weakref.WeakSet[Outbox] = weakref.WeakSet()


def _report_depth() -> None:
    """``bridge_outbox_depth`` and ``bridge_outbox_oldest_age_seconds``: every outbox of this
    process (worker 0 may replay several). On writes, advances and the watchdog's tick, never
    per published event, and O(outboxes): the age is the head's, records being held in the order
    they were written; only after a requeue (a stuck record written again behind the others,
    ``outbox_record_requeued``) are all of them looked at, until the outbox is empty."""
    depth, oldest = 0, None
    for outbox in _OPEN:
        spool = outbox.spool
        records = spool.records
        depth += len(records)
        if not records:
            spool.requeued = False
            continue
        # When the bridge received it (a record read back after a restart keeps its time): a
        # head already settled is forgotten by the next advance, so it may count a moment.
        heads = records if spool.requeued else (records[0],)
        received = min(r.message.timestamp for r in heads if not r.settled or r is records[0])
        oldest = received.timestamp() if oldest is None else min(oldest, received.timestamp())
    metrics.OUTBOX_DEPTH.set(depth)
    metrics.OUTBOX_OLDEST_AGE.set(0.0 if oldest is None else max(0.0, time.time() - oldest))


class Outbox:
    """See the module docstring. ``open()`` before use, ``close()`` after."""

    def __init__(
        self,
        folder: str | Path,
        max_bytes: int,
        publisher: Publisher,
        exchanges: set[str] | None = None,
        unrouted_exchange: str = "",
        *,
        stall_seconds: float = 30.0,
    ) -> None:
        self.spool = Spool(Path(folder), max_bytes)
        self.stall_seconds = stall_seconds
        self.publisher = publisher
        # A record whose exchange the topology no longer has is replayed to the unrouted
        # exchange instead (a reload sets ``exchanges`` anew).
        self.exchanges = exchanges
        self.unrouted_exchange = unrouted_exchange
        self.replayer = Replayer(self)
        self.quarantined = 0
        self._open = False
        self._write_failed = False
        self._queue: list[_Appending] = []
        self._wake_writer = asyncio.Event()
        self._drained = asyncio.Event()  # set whenever records are forgotten
        self._io = asyncio.Lock()  # the files: writes, rewrites, the cursor, rotation
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def folder(self) -> Path:
        return self.spool.folder

    @property
    def max_bytes(self) -> int:
        return self.spool.max_bytes

    @property
    def depth(self) -> int:
        return len(self.spool.records)

    @property
    def replayed(self) -> int:
        return self.replayer.replayed

    @property
    def usable(self) -> bool:
        return self._open and self.spool.held_bytes < self.max_bytes and not self._write_failed

    @property
    def stalled(self) -> bool:
        """A backlog the broker does not take although it is connected, for a while."""
        since = self.replayer.failing_since
        return (
            bool(self.spool.records)
            and since is not None
            and time.monotonic() - since >= self.stall_seconds
        )

    # -- start-up -------------------------------------------------------------------------------

    async def open(self) -> None:
        """Take the folder's lock, then read what a previous run left (raises
        :class:`OutboxUnavailable` when either fails: ``outbox_locked``, ``outbox_unavailable``)."""
        try:
            await asyncio.to_thread(self.spool.open)
        except OutboxLocked as exc:
            raise OutboxUnavailable("outbox_locked", str(exc)) from None
        except OSError as exc:
            raise OutboxUnavailable(
                "outbox_unavailable", f"cannot open the outbox in {self.folder}: {exc.strerror}"
            ) from None
        if self.spool.files.torn is not None:
            name, kept, dropped = self.spool.files.torn
            log.warning(
                "outbox_torn_tail_truncated", segment=name, kept_bytes=kept, dropped_bytes=dropped
            )
        self._open = True
        _OPEN.add(self)
        self._tasks = [
            asyncio.create_task(self._writer(), name="outbox-writer"),
            asyncio.create_task(self.replayer.run(), name="outbox-replayer"),
            asyncio.create_task(self._watchdog(), name="outbox-watchdog"),
        ]
        _report_depth()
        if self.spool.records:
            log.warning(
                "outbox_backlog_found",
                events=self.depth,
                bytes=self.spool.held_bytes,
                action="replaying once the broker takes it",
            )
            self.replayer.wake()

    async def close(self) -> None:
        # Under the lock: a write or rotation running in a thread (which cancelling its task
        # would not stop) finishes before the tasks go and the descriptors are closed.
        async with self._io:
            for task in self._tasks:
                task.cancel()
            for task in self._tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            _fail(self._queue, OutboxUnavailable("outbox_closed", "the outbox is closing"))
            self._queue.clear()
            self._open = False
            self.spool.close()
            _OPEN.discard(self)
            _report_depth()  # what is left open: a closed outbox's backlog is no longer ours

    # -- writing --------------------------------------------------------------------------------

    async def append(
        self,
        messages: Sequence[Outbound],
        doubts: Sequence[asyncio.Future[Any] | None] | None = None,
    ) -> None:
        """Return once every message is written and fsync'ed, or raise a 503-kind error.

        ``doubts``: for each message, the open confirm of a publish that timed out, if any."""
        if not self._open:
            raise OutboxUnavailable("outbox_unavailable", "the outbox is not open")
        frames = [encode(m) for m in messages]
        if not self.spool.reserve(sum(len(f) for f in frames)):
            metrics.OUTBOX_REFUSED.labels("full").inc()
            raise OutboxFull(
                "outbox_full", f"the outbox holds {self.spool.held_bytes} bytes, the limit"
            )
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append((frames, list(messages), list(doubts or [None] * len(messages)), future))
        self._wake_writer.set()
        # Shielded: a request that gives up (deadline) does not cancel a write others share.
        await asyncio.shield(future)

    async def _writer(self) -> None:
        while True:
            await self._wake_writer.wait()
            self._wake_writer.clear()
            batch, self._queue = self._queue, []
            if not batch:
                continue
            try:
                await self._write_batch(batch)
            except asyncio.CancelledError:  # closing: what was not written is a 503
                _fail(batch, OutboxUnavailable("outbox_closed", "the outbox is closing"))
                raise

    async def _write_batch(self, batch: list[_Appending]) -> None:
        """One group commit: write and fsync ``batch``'s frames, then answer its appends."""
        frames = [frame for group, _, _, _ in batch for frame in group]
        started = time.perf_counter()
        try:
            async with self._io:
                ends = await asyncio.to_thread(self.spool.write, frames)
                if ends is None:  # the folder was lost under us: all it held, again
                    ends = await self._rewrite(frames)
                records = self.spool.hold(
                    ends,
                    frames,
                    (m for _, group, _, _ in batch for m in group),
                    (d for _, _, group, _ in batch for d in group),
                )
        except Exception as exc:  # noqa: BLE001 - every failure is a 503 for these appends
            self._write_failed = True
            self.spool.release(sum(len(f) for f in frames))
            metrics.OUTBOX_REFUSED.labels("write_failed").inc()
            log.error("outbox_write_failed", error=str(exc), events=len(frames))
            _fail(batch, OutboxUnavailable("outbox_unavailable", f"outbox write failed: {exc}"))
            return
        self._write_failed = False
        metrics.OUTBOX_FSYNC_SECONDS.observe(time.perf_counter() - started)
        for record in records:
            if record.doubt is not None:
                self.replayer.await_late(record, record.doubt)
        for _, _, _, future in batch:
            if not future.done():
                future.set_result(None)
        _report_depth()
        self.replayer.wake()

    async def _rewrite(self, frames: list[bytes]) -> list[Position]:
        """The folder (or a segment) was deleted or replaced: write every record not yet
        confirmed, then ``frames``, into a new folder; the positions of ``frames``.

        On the loop, under ``_io``: what is held is chosen here (the loop settles records
        meanwhile), only the files are written in a thread."""
        held, held_frames = self.spool.to_rewrite()
        ends = await asyncio.to_thread(self.spool.rewrite, held_frames + frames)
        self.spool.rewritten(held, held_frames, ends)
        log.error(
            "outbox_folder_lost",
            folder=str(self.folder),
            rewritten=len(held) + len(frames),
            action="recreated the folder and wrote every waiting event into it again",
        )
        return ends[len(held) :]

    async def _watchdog(self) -> None:
        """Every second: are the folder and its files still ours? If not, write again what
        they held (the outbox's records from memory, the quarantine's from its open file)."""
        while True:
            await asyncio.sleep(WATCH_SECONDS)
            try:
                async with self._io:
                    if not await asyncio.to_thread(self.spool.intact):
                        await self._rewrite([])
                        self._write_failed = False
                    await asyncio.to_thread(self.spool.quarantine_file.keep)
            except (OSError, OutboxLocked) as exc:
                self._write_failed = True  # /readyz: unusable; appends get a 503 meanwhile
                log.error("outbox_rewrite_failed", folder=str(self.folder), error=str(exc))
            _report_depth()  # the head's age grows while nothing is written or replayed

    async def quarantine(self, entries: Sequence[tuple[Outbound, str, str]]) -> None:
        """Keep ``(message, kind, reason)`` in the quarantine file durably (OSError if not):
        messages the broker refuses for what they are."""
        now = datetime.now(UTC).isoformat()
        frames = [
            encode(message, quarantine_reason=reason, quarantined_at=now)
            for message, _, reason in entries
        ]
        quarantine_file = self.spool.quarantine_file
        async with self._io:
            await asyncio.to_thread(quarantine_file.add, frames)
        for message, kind, reason in entries:
            self.quarantined += 1
            metrics.QUARANTINED.labels(kind).inc()
            log.error(
                "event_quarantined",
                message_id=message.message_id,
                exchange=message.exchange,
                routing_key=message.routing_key,
                body_bytes=len(message.body),
                reason=reason,
                file=str(quarantine_file.path),
                action="kept aside, never replayed: see `events-bridge quarantine`",
            )

    # -- forgetting what is confirmed (the replayer calls it) -----------------------------------

    async def advance(self) -> None:
        """Forget the settled records at the front: the cursor moves past them."""
        records = self.spool.records
        if not records or not records[0].settled:
            return
        async with self._io:
            last = self.spool.forget_settled()
            if last is None:
                return
            try:
                await asyncio.to_thread(self.spool.move_cursor, last)
            except OSError as exc:
                # Confirmed all the same: a restart before the cursor is written replays them
                # again (duplicates, never a loss). A folder gone is written anew at once.
                log.warning("outbox_cursor_write_failed", error=str(exc))
                if not await asyncio.to_thread(self.spool.intact):
                    with contextlib.suppress(OSError, OutboxLocked):
                        await self._rewrite([])
        self._drained.set()
        _report_depth()
        if not self.spool.records:
            await self._start_afresh()
            log.info("outbox_drained", replayed=self.replayed)

    async def _start_afresh(self) -> None:
        """Everything is confirmed: a new segment, the old ones deleted (``Spool.recycle``)."""
        async with self._io:
            if not self.spool.recyclable:
                return
            try:
                old = await asyncio.to_thread(self.spool.recycle)
            except OSError as exc:
                log.warning("outbox_segment_recycle_failed", error=str(exc))
                return
            log.info("outbox_segment_recycled", segment=old)

    async def drain(self, seconds: float) -> bool:
        """Give the replayer up to ``seconds`` to empty the outbox (SIGTERM); True if it did."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                while self.spool.records:
                    self._drained.clear()
                    await self._drained.wait()
        return not self.spool.records
