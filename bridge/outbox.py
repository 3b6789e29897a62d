"""The on-disk outbox: where an accepted event waits when the broker cannot take it yet.

A request is answered 200 only when every event is safe: confirmed by RabbitMQ, or written here
and fsync'ed. A replayer publishes the backlog oldest first, with confirms, once the broker can
take it, and forgets records only after their confirm.

On disk (``outbox.dir``): append-only segment files ``segment-<n>.log`` of framed records, and a
``cursor`` file naming the first record not yet confirmed. A frame is::

    b"EBX1" | length (u32, big-endian) | crc32 of the payload (u32) | payload

and a payload is ``len(meta) (u32) | meta (JSON: exchange, routing key, properties, headers) |
body``. Writes are grouped: every append waiting at the same moment shares one write and one
``fsync`` (group commit). At start the outbox reads every segment, keeps the frames that check
out and truncates a torn tail (a crash in the middle of a write); segments wholly before the
cursor are deleted. The cursor is replaced atomically (write, fsync, rename) after a batch is
confirmed, so a crash between confirm and cursor means a duplicate, never a loss.

Bounds: ``outbox.max_bytes`` of unconfirmed records (more: :class:`OutboxFull`, a 503), and a
full disk or any write error is :class:`OutboxUnavailable` (a 503, never a 200).

Does not: decide when to use the outbox (``bridge.receiver`` does, by ``outbox.mode``), or talk
AMQP itself: the replayer calls the publisher.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import struct
import time
import weakref
import zlib
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Final

import orjson
import structlog

from bridge import metrics
from bridge.errors import BrokerUnavailable, Unavailable
from bridge.message import Outbound
from bridge.publisher import Publisher

log = structlog.get_logger("bridge.outbox")

MAGIC: Final = b"EBX1"
FRAME: Final = struct.Struct(">4sII")
META_LENGTH: Final = struct.Struct(">I")
SEGMENT_BYTES: Final = 8 * 1024 * 1024
REPLAY_BATCH: Final = 64


class OutboxFull(Unavailable):
    pass


class OutboxUnavailable(Unavailable):
    pass


def encode(message: Outbound) -> bytes:
    meta = orjson.dumps(
        {
            "exchange": message.exchange,
            "routing_key": message.routing_key,
            "message_id": message.message_id,
            "type": message.type,
            "timestamp": message.timestamp.isoformat(),
            "headers": message.headers,
            "content_type": message.content_type,
            "app_id": message.app_id,
        }
    )
    payload = META_LENGTH.pack(len(meta)) + meta + message.body
    return FRAME.pack(MAGIC, len(payload), zlib.crc32(payload)) + payload


def decode(data: bytes) -> tuple[list[tuple[int, Outbound]], int]:
    """The records in ``data`` with the offset just past each, and where the valid part ends."""
    records: list[tuple[int, Outbound]] = []
    offset = 0
    while offset + FRAME.size <= len(data):
        magic, length, crc = FRAME.unpack_from(data, offset)
        start, end = offset + FRAME.size, offset + FRAME.size + length
        if magic != MAGIC or end > len(data):
            break
        payload = data[start:end]
        if zlib.crc32(payload) != crc or length < META_LENGTH.size:
            break
        (meta_length,) = META_LENGTH.unpack_from(payload)
        try:
            meta: dict[str, Any] = orjson.loads(
                payload[META_LENGTH.size : META_LENGTH.size + meta_length]
            )
            message = Outbound(
                exchange=meta["exchange"],
                routing_key=meta["routing_key"],
                body=payload[META_LENGTH.size + meta_length :],
                message_id=meta["message_id"],
                type=meta["type"],
                timestamp=datetime.fromisoformat(meta["timestamp"]),
                headers=meta["headers"],
                content_type=meta["content_type"],
                app_id=meta["app_id"],
            )
        except (orjson.JSONDecodeError, KeyError, ValueError, TypeError):
            break
        records.append((end, message))
        offset = end
    return records, offset


@dataclass
class _Pending:
    segment: int
    end: int  # offset just past the record in its segment
    message: Outbound
    size: int


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
    ) -> None:
        self.folder = Path(folder)
        self.max_bytes = max_bytes
        self.publisher = publisher
        # A record whose exchange the topology no longer has would fail forever (and close the
        # publish channel each time): it is replayed to the unrouted exchange instead.
        self.exchanges = exchanges
        self.unrouted_exchange = unrouted_exchange
        self._pending: deque[_Pending] = deque()
        self._bytes = 0
        self._segment = 0
        self._segment_size = 0
        self._fd: int | None = None
        self._rotate = False  # the current segment may hold a half-written frame: move on
        self._write_failed = False
        self._queue: list[tuple[list[bytes], list[Outbound], asyncio.Future[None]]] = []
        self._wake_writer = asyncio.Event()
        self._wake_replayer = asyncio.Event()
        self._drained = asyncio.Event()  # set after every confirmed replay batch
        self._io = asyncio.Lock()  # the writer's writes and the replayer's segment rotation
        self._tasks: list[asyncio.Task[None]] = []
        self.replayed = 0

    @property
    def depth(self) -> int:
        return len(self._pending)

    @property
    def usable(self) -> bool:
        return self._fd is not None and self._bytes < self.max_bytes and not self._write_failed

    def _path(self, segment: int) -> Path:
        return self.folder / f"segment-{segment:012d}.log"

    # -- start-up -------------------------------------------------------------------------------

    async def open(self) -> None:
        try:
            await asyncio.to_thread(self._recover)
        except OSError as exc:
            raise OutboxUnavailable(
                "outbox_unavailable", f"cannot open the outbox in {self.folder}: {exc.strerror}"
            ) from None
        _OPEN.add(self)
        self._tasks = [
            asyncio.create_task(self._writer(), name="outbox-writer"),
            asyncio.create_task(self._replayer(), name="outbox-replayer"),
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

    def _recover(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        cursor_segment, cursor_offset = self._read_cursor()
        segments = sorted(self._segments())
        for number in segments:
            path = self._path(number)
            if number < cursor_segment:
                path.unlink()
                continue
            data = path.read_bytes()
            records, valid = decode(data)
            if valid < len(data):
                log.warning(
                    "outbox_torn_tail_truncated",
                    segment=path.name,
                    kept_bytes=valid,
                    dropped_bytes=len(data) - valid,
                )
                with path.open("r+b") as handle:
                    handle.truncate(valid)
                    handle.flush()
                    os.fsync(handle.fileno())
            start = cursor_offset if number == cursor_segment else 0
            previous = 0
            for end, message in records:
                if end > start:
                    self._pending.append(_Pending(number, end, message, end - previous))
                    self._bytes += end - previous
                previous = end
        # Always a segment after everything there is, and after the cursor's.
        self._open_segment(max(segments[-1] if segments else -1, cursor_segment) + 1)

    def _read_cursor(self) -> tuple[int, int]:
        try:
            text = (self.folder / "cursor").read_text().split()
            return int(text[0]), int(text[1])
        except (OSError, ValueError, IndexError):
            return 0, 0

    def _write_cursor(self, segment: int, offset: int) -> None:
        temporary = self.folder / "cursor.tmp"
        with temporary.open("w") as handle:
            handle.write(f"{segment} {offset}\n")
            handle.flush()
            os.fsync(handle.fileno())
        temporary.replace(self.folder / "cursor")
        directory = os.open(self.folder, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)

    def _open_segment(self, number: int | None = None) -> None:
        """Switch writing to segment ``number`` (default: the current one). The new file is
        opened before the old is closed, and nothing changes if the open fails."""
        number = self._segment if number is None else number
        # A raw descriptor, no buffer: after a failed write nothing lingers to be flushed later.
        fd = os.open(self._path(number), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        old, self._fd, self._segment = self._fd, fd, number
        self._segment_size = os.fstat(fd).st_size
        self._rotate = False
        if old is not None:
            os.close(old)

    async def close(self) -> None:
        # Under the lock: a write or rotation running in a thread (which cancelling its task
        # would not stop) finishes before the tasks go and the descriptor is closed.
        async with self._io:
            for task in self._tasks:
                task.cancel()
            for task in self._tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            for _, _, future in self._queue:
                if not future.done():
                    future.set_exception(
                        OutboxUnavailable("outbox_closed", "the outbox is closing")
                    )
            self._queue.clear()
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            _OPEN.discard(self)

    # -- writing --------------------------------------------------------------------------------

    async def append(self, messages: Sequence[Outbound]) -> None:
        """Return once every message is written and fsync'ed, or raise a 503-kind error."""
        if self._fd is None:
            raise OutboxUnavailable("outbox_unavailable", "the outbox is not open")
        frames = [encode(m) for m in messages]
        size = sum(len(f) for f in frames)
        if self._bytes + size > self.max_bytes:
            metrics.OUTBOX_REFUSED.labels("full").inc()
            raise OutboxFull("outbox_full", f"the outbox holds {self._bytes} bytes, the limit")
        self._bytes += size  # reserved now, so concurrent appends cannot overshoot the bound
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append((frames, list(messages), future))
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
            data = b"".join(b"".join(frames) for frames, _, _ in batch)
            started = time.perf_counter()
            try:
                async with self._io:
                    ends = await asyncio.to_thread(self._write, data, [f for f, _, _ in batch])
            except Exception as exc:  # noqa: BLE001 - every failure is a 503 for these appends
                self._write_failed = True
                self._bytes -= len(data)
                metrics.OUTBOX_REFUSED.labels("write_failed").inc()
                log.error(
                    "outbox_write_failed", error=str(exc), events=sum(len(m) for _, m, _ in batch)
                )
                error = OutboxUnavailable("outbox_unavailable", f"outbox write failed: {exc}")
                for _, _, future in batch:
                    if not future.done():
                        future.set_exception(error)
                continue
            self._write_failed = False
            metrics.OUTBOX_FSYNC_SECONDS.observe(time.perf_counter() - started)
            for (frames, messages, future), record_ends in zip(batch, ends, strict=True):
                previous_sizes = [len(f) for f in frames]
                for message, (segment, end), size in zip(
                    messages, record_ends, previous_sizes, strict=True
                ):
                    self._pending.append(_Pending(segment, end, message, size))
                if not future.done():
                    future.set_result(None)
            _report_depth()
            self._wake_replayer.set()

    def _write(self, data: bytes, frames: list[list[bytes]]) -> list[list[tuple[int, int]]]:
        """Write and fsync (in a thread); returns (segment, end offset) for every frame."""
        if self._segment_size >= SEGMENT_BYTES or self._rotate:
            self._open_segment(self._segment + 1)
        start = self._segment_size
        assert self._fd is not None
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view) :]
            os.fsync(self._fd)
        except OSError:
            # Leave no half-written frame behind: a frame after it would be cut off at the next
            # start. If the file cannot be put back as it was, the next write starts a new one.
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, start)
            try:
                self._rotate = os.fstat(self._fd).st_size != start
            except OSError:
                self._rotate = True
            raise
        ends: list[list[tuple[int, int]]] = []
        offset = start
        for group in frames:
            group_ends = []
            for frame in group:
                offset += len(frame)
                group_ends.append((self._segment, offset))
            ends.append(group_ends)
        self._segment_size = offset
        return ends

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
            if not self._pending:
                self._wake_replayer.clear()
                await self._wake_replayer.wait()
                continue
            if not self.publisher.ready:
                await asyncio.sleep(delay)
                continue
            batch = list(self._pending)[:REPLAY_BATCH]
            try:
                await self.publisher.publish([self._homed(p.message) for p in batch])
            except BrokerUnavailable as exc:
                log.warning(
                    "outbox_replay_failed", reason=exc.reason, events=len(batch), retry_in=delay
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            delay = 0.2
            last = batch[-1]
            try:
                await asyncio.to_thread(self._write_cursor, last.segment, last.end)
            except OSError as exc:
                # Confirmed all the same: a restart before the cursor is written replays them
                # again (duplicates, never a loss).
                log.warning("outbox_cursor_write_failed", error=str(exc))
            for _ in batch:
                done = self._pending.popleft()
                self._bytes -= done.size
            self.replayed += len(batch)
            self._drained.set()
            metrics.OUTBOX_REPLAYED.inc(len(batch))
            _report_depth()
            await asyncio.to_thread(self._forget_segments_before, last.segment)
            if not self._pending:
                await self._start_afresh()
                log.info("outbox_drained", replayed=self.replayed)

    async def _start_afresh(self) -> None:
        """Everything is confirmed: move to a new segment and delete the old ones, so the space
        they take (a full disk, maybe) is free for the next outage."""
        async with self._io:
            if self._pending or self._segment_size == 0:
                return
            old = self._segment
            await asyncio.to_thread(self._open_segment, old + 1)
            await asyncio.to_thread(self._forget_segments_before, self._segment)
            with contextlib.suppress(OSError):
                await asyncio.to_thread(self._write_cursor, self._segment, 0)
            log.info("outbox_segment_recycled", segment=old)

    def _homed(self, message: Outbound) -> Outbound:
        if self.exchanges is None or message.exchange in self.exchanges:
            return message
        return dataclasses.replace(message, exchange=self.unrouted_exchange)

    def _segments(self) -> dict[int, Path]:
        """The segment files in the folder, by number (stray files are ignored)."""
        found = {}
        for path in self.folder.glob("segment-*.log"):
            number = path.stem.removeprefix("segment-")
            if number.isdigit():
                found[int(number)] = path
        return found

    def _forget_segments_before(self, segment: int) -> None:
        for number, path in self._segments().items():
            if number < segment and number != self._segment:
                path.unlink(missing_ok=True)

    async def drain(self, seconds: float) -> bool:
        """Give the replayer up to ``seconds`` to empty the outbox (SIGTERM); True if it did."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                while self._pending:
                    self._drained.clear()
                    await self._drained.wait()
        return not self._pending
