"""The outbox: where an accepted event waits when the broker cannot take it yet.

A request is answered 200 only when every event is safe: confirmed by RabbitMQ, or written here
and fsync'ed (the files, their lock and their durability: ``bridge.segments``). A replayer
publishes the backlog oldest first, with confirms, once the broker can take it, and forgets a
record only after its confirm.

- **Group commit.** Every append waiting at the same moment shares one write and one ``fsync``.
- **In doubt.** A publish that timed out may still be confirmed: the publisher hands over its
  open confirm with the message. The replayer waits for that verdict (at most
  ``publisher.DOUBT_SECONDS``) and replays the record only if it is not an ack, so a slow
  confirm and the stored copy never both reach the queue.
- **Poison records.** A record no broker takes as it is (the publisher refuses it before
  sending), or one the broker refuses alone twice by closing the channel or connection over it,
  goes to the quarantine file with its reason: counted, logged, never replayed, and never in the
  way of the records behind it. After a close that names no message, the replayer sends the
  records it was sending one at a time, to find the one.
- **Stalled.** A backlog that makes no progress for ``outbox.stall_seconds`` (30) although the
  broker is connected is ``stalled``: ``/readyz`` then says not ready.
- **Folder lost.** If the folder is deleted or replaced while we run, the next write notices it
  before anyone is answered, and everything the outbox holds is written into a new folder from
  memory; if that fails, the appends get a 503. A watchdog looks every
  :data:`WATCH_SECONDS` too, so events answered before the folder went are written again even
  when nothing else is appended.

Bounds: ``outbox.max_bytes`` of unconfirmed records (more: :class:`OutboxFull`, a 503), and a
full disk or any write error is :class:`OutboxUnavailable` (a 503, never a 200).

Does not: decide when to use the outbox (``bridge.receiver`` does, by ``outbox.mode``), or talk
AMQP itself: the replayer calls the publisher.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
import weakref
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import structlog
from pamqp.commands import Basic

from bridge import metrics
from bridge.errors import BrokerUnavailable, Unavailable
from bridge.message import Outbound
from bridge.publisher import DOUBT_SECONDS, Publisher, unsafe_and_refused
from bridge.segments import OutboxLocked, QuarantineFile, SegmentLog, encode

log = structlog.get_logger("bridge.outbox")

REPLAY_BATCH: Final = 64
STRIKES: Final = 2  # refusals of a record sent alone before it is quarantined
REQUEUE_AFTER: Final = 3  # failures of the oldest record before it goes behind the others
WATCH_SECONDS: Final = 1.0


class OutboxFull(Unavailable):
    pass


class OutboxUnavailable(Unavailable):
    pass


@dataclass(eq=False)
class _Pending:
    segment: int
    end: int  # offset just past the record in its segment
    message: Outbound
    size: int
    doubt: asyncio.Future[Any] | None = None  # the open confirm of a publish that timed out
    settled: bool = False  # confirmed or quarantined: forgotten once those before it are
    strikes: int = 0  # closes of the channel over it, sent alone
    failures: int = 0  # other failed publishes of it (nacks, returns)
    poison: tuple[str, str] | None = None  # (kind, reason): never sent again; for the quarantine


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
    """``bridge_outbox_depth``: every outbox of this process (worker 0 may replay several)."""
    metrics.OUTBOX_DEPTH.set(sum(outbox.depth for outbox in _OPEN))


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
        self.files = SegmentLog(Path(folder))
        self.stall_seconds = stall_seconds
        self.quarantine_file = QuarantineFile(Path(folder))
        self.max_bytes = max_bytes
        self.publisher = publisher
        # A record whose exchange the topology no longer has would fail forever (and close the
        # publish channel each time): it is replayed to the unrouted exchange instead.
        self.exchanges = exchanges
        self.unrouted_exchange = unrouted_exchange
        self._pending: deque[_Pending] = deque()
        self._bytes = 0
        self._open = False
        self._write_failed = False
        self._queue: list[_Appending] = []
        self._wake_writer = asyncio.Event()
        self._wake_replayer = asyncio.Event()
        self._drained = asyncio.Event()  # set whenever records are forgotten
        self._io = asyncio.Lock()  # the files: writes, rewrites, the cursor, rotation
        self._tasks: list[asyncio.Task[None]] = []
        self._isolate = 0  # records still to replay one at a time (see the module docstring)
        self._failing_since: float | None = None
        self.replayed = 0
        self.quarantined = 0

    @property
    def folder(self) -> Path:
        return self.files.folder

    @property
    def depth(self) -> int:
        return len(self._pending)

    @property
    def usable(self) -> bool:
        return self._open and self._bytes < self.max_bytes and not self._write_failed

    @property
    def stalled(self) -> bool:
        """A backlog the broker does not take although it is connected, for a while."""
        since = self._failing_since
        return (
            bool(self._pending)
            and since is not None
            and time.monotonic() - since >= self.stall_seconds
        )

    # -- start-up -------------------------------------------------------------------------------

    async def open(self) -> None:
        """Take the folder's lock, then read what a previous run left (raises
        :class:`OutboxUnavailable` when either fails: ``outbox_locked``, ``outbox_unavailable``)."""
        try:
            found = await asyncio.to_thread(self._open_files)
        except OutboxLocked as exc:
            raise OutboxUnavailable("outbox_locked", str(exc)) from None
        except OSError as exc:
            raise OutboxUnavailable(
                "outbox_unavailable", f"cannot open the outbox in {self.folder}: {exc.strerror}"
            ) from None
        if self.files.torn is not None:
            name, kept, dropped = self.files.torn
            log.warning(
                "outbox_torn_tail_truncated", segment=name, kept_bytes=kept, dropped_bytes=dropped
            )
        for segment, end, message, size in found:
            self._pending.append(_Pending(segment, end, message, size))
            self._bytes += size
        self._open = True
        _OPEN.add(self)
        self._tasks = [
            asyncio.create_task(self._writer(), name="outbox-writer"),
            asyncio.create_task(self._replayer(), name="outbox-replayer"),
            asyncio.create_task(self._watchdog(), name="outbox-watchdog"),
        ]
        _report_depth()
        if self._pending:
            log.warning(
                "outbox_backlog_found",
                events=self.depth,
                bytes=self._bytes,
                action="replaying once the broker takes it",
            )
            self._wake_replayer.set()

    def _open_files(self) -> list[tuple[int, int, Outbound, int]]:
        self.files.lock()  # before anything is read: another daemon's records are not ours
        return self.files.recover()

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
            self.quarantine_file.close()
            self.files.close()  # releases the folder's lock
            _OPEN.discard(self)

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
        size = sum(len(f) for f in frames)
        if self._bytes + size > self.max_bytes:
            metrics.OUTBOX_REFUSED.labels("full").inc()
            raise OutboxFull("outbox_full", f"the outbox holds {self._bytes} bytes, the limit")
        self._bytes += size  # reserved now, so concurrent appends cannot overshoot the bound
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
                ends = await asyncio.to_thread(self._write, frames)
                if ends is None:  # the folder was lost under us: all it held, again
                    ends = await self._rewrite(frames)
                records = [
                    _Pending(segment, end, message, len(frame), doubt)
                    for (segment, end), frame, message, doubt in zip(
                        ends,
                        frames,
                        (m for _, group, _, _ in batch for m in group),
                        (d for _, _, group, _ in batch for d in group),
                        strict=True,
                    )
                ]
                self._pending.extend(records)
        except Exception as exc:  # noqa: BLE001 - every failure is a 503 for these appends
            self._write_failed = True
            self._bytes -= sum(len(f) for f in frames)
            metrics.OUTBOX_REFUSED.labels("write_failed").inc()
            log.error("outbox_write_failed", error=str(exc), events=len(frames))
            _fail(batch, OutboxUnavailable("outbox_unavailable", f"outbox write failed: {exc}"))
            return
        self._write_failed = False
        metrics.OUTBOX_FSYNC_SECONDS.observe(time.perf_counter() - started)
        for record in records:
            if record.doubt is not None:
                record.doubt.add_done_callback(self._settler(record))
        for _, _, _, future in batch:
            if not future.done():
                future.set_result(None)
        _report_depth()
        self._wake_replayer.set()

    def _write(self, frames: list[bytes]) -> list[tuple[int, int]] | None:
        """Write and fsync (in a thread, under ``_io``); (segment, end) of every frame, or None
        when the folder or a segment is no longer ours (the frames are then not safe)."""
        try:
            ends = self.files.write(b"".join(frames), [len(f) for f in frames])
        except FileNotFoundError:  # a new segment could not be made: the folder is gone
            return None
        return ends if self.files.intact() else None

    async def _rewrite(self, frames: list[bytes]) -> list[tuple[int, int]]:
        """The folder (or a segment) was deleted or replaced: write every record not yet
        confirmed, then ``frames``, into a new folder; (segment, end) of ``frames``.

        On the loop, under ``_io``: what is held is chosen here (the loop settles records
        meanwhile), only the files are written in a thread."""
        held = [p for p in self._pending if not p.settled]
        held_frames = [encode(p.message) for p in held]
        ends = await asyncio.to_thread(self.files.rewrite, held_frames + frames)
        written = dict(zip(map(id, held), zip(held_frames, ends, strict=False), strict=True))
        position = (ends[0][0], 0) if ends else (self.files.segment, 0)
        for record in self._pending:
            # What was not written again (settled) takes the place of the record before it,
            # so the cursor only ever moves forward.
            entry = written.get(id(record))
            if entry is not None:
                frame, position = entry
                self._bytes += len(frame) - record.size
                record.size = len(frame)
            record.segment, record.end = position
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
                    if not await asyncio.to_thread(self.files.intact):
                        await self._rewrite([])
                        self._write_failed = False
                    await asyncio.to_thread(self.quarantine_file.keep)
            except (OSError, OutboxLocked) as exc:
                self._write_failed = True  # /readyz: unusable; appends get a 503 meanwhile
                log.error("outbox_rewrite_failed", folder=str(self.folder), error=str(exc))

    # -- replaying ------------------------------------------------------------------------------

    async def _replayer(self) -> None:
        while True:
            try:
                await self._replay()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the replayer must outlive any one failure
                log.error("outbox_replayer_failed", error=repr(exc), retry_in=1.0)
                await asyncio.sleep(1.0)

    async def _replay(self) -> None:
        delay = 0.2
        while True:
            await self._advance()
            if not self._pending:
                self._failing_since = None
                self._wake_replayer.clear()
                await self._wake_replayer.wait()
                continue
            head = next((p for p in self._pending if not p.settled), None)
            if head is None:  # settled meanwhile (late confirms): forget them
                continue
            if head.poison is not None:  # its quarantine write failed: that, not a publish
                if not await self._quarantine_poison():
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 5.0)
                continue
            if head.doubt is not None and not head.doubt.done():
                # Its publish may yet be confirmed: wait for the verdict, not a second copy.
                await asyncio.wait({head.doubt}, timeout=DOUBT_SECONDS + 1.0)
                if not head.doubt.done():  # the publisher's own bound did not come: go on
                    head.doubt = None
                continue
            if not self.publisher.ready:
                await asyncio.sleep(delay)
                continue
            batch = self._next_batch()
            sending = [self._homed(p.message) for p in batch]
            try:
                await self.publisher.publish(sending)
            except BrokerUnavailable as exc:
                if not await self._after_failure(batch, sending, exc):
                    if self._failing_since is None:
                        self._failing_since = time.monotonic()
                    log.warning(
                        "outbox_replay_failed",
                        reason=exc.reason,
                        events=len(batch),
                        retry_in=delay,
                    )
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 5.0)
                continue
            for record in batch:
                record.settled = True
            metrics.count_published(r.message for r in batch)
            self._replayed(len(batch))
            self._failing_since = None
            delay = 0.2

    def _next_batch(self) -> list[_Pending]:
        """The oldest records to send: up to a batch, one while isolating, none past a record
        whose earlier publish is still in doubt."""
        size = 1 if self._isolate else REPLAY_BATCH
        batch: list[_Pending] = []
        for record in self._pending:
            if record.settled or record.poison is not None:
                continue
            if record.doubt is not None and not record.doubt.done():
                break
            batch.append(record)
            if len(batch) == size:
                break
        return batch

    def _replayed(self, count: int) -> None:
        self.replayed += count
        metrics.OUTBOX_REPLAYED.inc(count)
        self._isolate = max(0, self._isolate - count)

    async def _after_failure(
        self, batch: list[_Pending], sending: list[Outbound], exc: BrokerUnavailable
    ) -> bool:
        """Settle what the failed publish did confirm, keep its doubts, and quarantine what is
        poison; True when some record was settled (progress)."""
        unsafe, refused = unsafe_and_refused(exc, sending)
        record_of = {id(out): record for out, record in zip(sending, batch, strict=True)}
        not_confirmed = {id(out) for out, _ in unsafe} | {id(out) for out, _ in refused}
        confirmed = [
            r for out, r in zip(sending, batch, strict=True) if id(out) not in not_confirmed
        ]
        for record in confirmed:
            record.settled = True
        metrics.count_published(r.message for r in confirmed)
        if confirmed:
            self._replayed(len(confirmed))
        for out, doubt in unsafe:
            record = record_of[id(out)]
            if doubt is not None:
                record.doubt = doubt
                doubt.add_done_callback(self._settler(record))
            else:
                record.failures += 1
        for out, why in refused:
            record_of[id(out)].poison = ("unpublishable", why)
        if exc.reason == "broker_refused" and not refused:
            if len(batch) > 1:
                self._isolate = len(batch)  # which one? send them one at a time to find out
            else:
                record = batch[0]
                record.strikes += 1
                if record.strikes >= STRIKES:
                    record.poison = ("broker_refused", exc.detail)
        progress = bool(confirmed)
        if any(r.poison is not None for r in batch):
            progress = await self._quarantine_poison() or progress
        if confirmed:  # others go through, the oldest does not: it must not hold them up
            await self._requeue_stuck()
        return progress  # a requeue is no progress: the backoff goes on

    async def _quarantine_poison(self) -> bool:
        """Move every record found poison to the quarantine; False if it cannot be written
        (they are not sent again meanwhile: the write is what is retried)."""
        poison = [r for r in self._pending if r.poison is not None and not r.settled]
        if not poison:
            return False
        try:
            await self.quarantine([(r.message, *r.poison) for r in poison if r.poison])
        except OSError as exc:
            log.error("outbox_quarantine_failed", error=str(exc), events=len(poison))
            return False
        for record in poison:
            record.settled = True
        self._isolate = max(0, self._isolate - len(poison))
        return True

    async def _requeue_stuck(self) -> bool:
        """The oldest record keeps failing (nacked, returned) while others go through: it goes
        behind them, written again, so that the cursor and the space behind it move on."""
        waiting = [r for r in self._pending if not r.settled]
        head = waiting[0] if waiting else None
        if head is None or head.failures < REQUEUE_AFTER or len(waiting) < 2:
            return False
        try:
            await self.append([head.message])
        except Unavailable:  # full or unwritable: it stays where it is, and is retried there
            return False
        head.settled = True
        log.warning(
            "outbox_record_requeued",
            message_id=head.message.message_id,
            failures=head.failures,
            detail="the broker keeps refusing it; the events behind it go first",
        )
        return True

    async def quarantine(self, entries: Sequence[tuple[Outbound, str, str]]) -> None:
        """Keep ``(message, kind, reason)`` in the quarantine file durably (OSError if not):
        messages the broker refuses for what they are."""
        now = datetime.now(UTC).isoformat()
        frames = [
            encode(message, quarantine_reason=reason, quarantined_at=now)
            for message, _, reason in entries
        ]
        async with self._io:
            await asyncio.to_thread(self.quarantine_file.add, frames)
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
                file=str(self.quarantine_file.path),
                action="kept aside, never replayed: see `events-bridge quarantine`",
            )

    def settle_late(self, record: _Pending, confirmation: asyncio.Future[Any]) -> None:
        """The verdict on a record's earlier publish came: an ack settles it (no replay)."""
        if confirmation.cancelled() or confirmation.exception() is not None:
            return  # not confirmed: the replayer sends it
        if isinstance(confirmation.result(), Basic.Ack) and not record.settled:
            record.settled = True
            metrics.count_published((record.message,))
        self._wake_replayer.set()

    def _settler(self, record: _Pending) -> Any:
        return lambda confirmation: self.settle_late(record, confirmation)

    async def _advance(self) -> None:
        """Forget the settled records at the front: the cursor moves past them."""
        if not self._pending or not self._pending[0].settled:
            return
        async with self._io:
            last = None
            while self._pending and self._pending[0].settled:
                last = self._pending.popleft()
                self._bytes -= last.size
            if last is None:
                return
            try:
                await asyncio.to_thread(self.files.write_cursor, last.segment, last.end)
                await asyncio.to_thread(self.files.forget_before, last.segment)
            except OSError as exc:
                # Confirmed all the same: a restart before the cursor is written replays them
                # again (duplicates, never a loss). A folder gone is written anew at once.
                log.warning("outbox_cursor_write_failed", error=str(exc))
                if not await asyncio.to_thread(self.files.intact):
                    with contextlib.suppress(OSError, OutboxLocked):
                        await self._rewrite([])
        self._drained.set()
        _report_depth()
        if not self._pending:
            await self._start_afresh()
            log.info("outbox_drained", replayed=self.replayed)

    async def _start_afresh(self) -> None:
        """Everything is confirmed: move to a new segment and delete the old ones, so the space
        they take (a full disk, maybe) is free for the next outage."""
        async with self._io:
            if self._pending or self.files.segment_size == 0:
                return
            old = self.files.segment
            try:
                await asyncio.to_thread(self.files.open_segment, old + 1)
                await asyncio.to_thread(self.files.forget_before, self.files.segment)
                await asyncio.to_thread(self.files.write_cursor, self.files.segment, 0)
            except OSError as exc:
                log.warning("outbox_segment_recycle_failed", error=str(exc))
                return
            log.info("outbox_segment_recycled", segment=old)

    def _homed(self, message: Outbound) -> Outbound:
        if self.exchanges is None or message.exchange in self.exchanges:
            return message
        return dataclasses.replace(message, exchange=self.unrouted_exchange)

    async def drain(self, seconds: float) -> bool:
        """Give the replayer up to ``seconds`` to empty the outbox (SIGTERM); True if it did."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                while self._pending:
                    self._drained.clear()
                    await self._drained.wait()
        return not self._pending
