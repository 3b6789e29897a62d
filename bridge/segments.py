"""The outbox's segment log on disk: one locked folder of segment files and a cursor.

Owns the record format and every durability rule for the outbox's files; ``bridge.spool`` calls
it (from a thread: blocking I/O throughout) and keeps the quarantine file in the same format;
``bridge.outbox`` owns what the records mean.

In ``outbox.dir``: ``lock`` (held with ``flock`` by the one daemon that owns the folder, taken
before anything is read), segment files ``segment-<n>.log`` of framed records appended in order,
``cursor`` naming the first record not yet confirmed, and ``quarantine.log``: records the broker
refuses for what they are, kept for an operator. A frame is::

    b"EBX1" | length (u32, big-endian) | crc32 of the payload (u32) | payload

and a payload is ``len(meta) (u32) | meta (JSON: exchange, routing key, properties, headers) |
body``. A torn tail (a crash in the middle of a write) is cut off at start.

Durability (POSIX): a record counts as written once its file is ``fsync``'ed, and a file once
its folder entry is: the folder is ``fsync``'ed after a segment, the cursor (written aside and
renamed) or the quarantine file is created, and the parent after the folder itself is (the
README, "Delivery semantics").

A folder deleted while we run (a tmp cleaner, a remounted volume) would take records answered
200 with it. After every write, :meth:`SegmentLog.intact` checks that the folder and every
segment still holding records are the ones we made (same inode, still linked); when they are
not, the outbox rewrites what it holds into a new folder (:meth:`SegmentLog.rewrite`) before it
answers, or answers 503.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import struct
import zlib
from datetime import datetime
from pathlib import Path
from typing import Any, Final

import orjson

from bridge.message import Outbound

MAGIC: Final = b"EBX1"
FRAME: Final = struct.Struct(">4sII")
META_LENGTH: Final = struct.Struct(">I")
SEGMENT_BYTES: Final = 8 * 1024 * 1024
LOCK_FILE: Final = "lock"


class OutboxLocked(Exception):
    """Another process holds the outbox folder: it is that daemon's, not ours."""


def encode(message: Outbound, **extra: Any) -> bytes:
    """One record: ``message``, and ``extra`` fields kept in its meta (a quarantine reason)."""
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
            "primary": message.primary,
            **extra,
        }
    )
    payload = META_LENGTH.pack(len(meta)) + meta + message.body
    return FRAME.pack(MAGIC, len(payload), zlib.crc32(payload)) + payload


def decode(data: bytes) -> tuple[list[tuple[int, Outbound]], int]:
    """The records in ``data`` with the offset just past each, and where the valid part ends."""
    records, valid = decode_with_meta(data)
    return [(end, message) for end, message, _ in records], valid


def decode_with_meta(data: bytes) -> tuple[list[tuple[int, Outbound, dict[str, Any]]], int]:
    """Like :func:`decode`, with each record's meta (for the extra fields)."""
    records: list[tuple[int, Outbound, dict[str, Any]]] = []
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
                primary=bool(meta.get("primary", True)),
            )
        except (orjson.JSONDecodeError, KeyError, ValueError, TypeError):
            break
        records.append((end, message, meta))
        offset = end
    return records, offset


def fsync_folder(folder: Path) -> None:
    """Make ``folder``'s entries (files created, renamed) durable."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_folder(folder: Path) -> None:
    """Create ``folder`` (and its parents) durably, if it is not there."""
    missing = []
    at = folder
    while not at.exists():
        missing.append(at)
        at = at.parent
    for path in reversed(missing):
        with contextlib.suppress(FileExistsError):
            path.mkdir()
        fsync_folder(path.parent)


def file_identity(stat: os.stat_result) -> tuple[int, int]:
    """Which file ``stat`` describes: another file at the same path has another identity."""
    return stat.st_dev, stat.st_ino


def write_all(fd: int, data: bytes) -> None:
    """All of ``data`` to ``fd`` (a write may take only part of it); no fsync."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class SegmentLog:
    """The outbox folder's segments and cursor; see the module docstring."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.segment = 0  # where appends go
        self.segment_size = 0
        self._fd: int | None = None
        self._lock_fd: int | None = None
        self._folder_id: tuple[int, int] | None = None
        self._segment_ids: dict[int, tuple[int, int]] = {}  # segments that may hold records
        self.rotate = False  # the current segment may hold a half-written frame: move on
        self.rewrites = 0
        self.torn: tuple[str, int, int] | None = None  # at recover: segment, kept, dropped bytes

    def path(self, segment: int) -> Path:
        return self.folder / f"segment-{segment:012d}.log"

    # -- owning the folder ----------------------------------------------------------------------

    def lock(self) -> None:
        """Create the folder if needed and take its lock, or raise :class:`OutboxLocked`."""
        make_folder(self.folder)
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                if file_identity(os.stat(self.folder / LOCK_FILE)) == file_identity(
                    os.fstat(self._lock_fd)
                ):
                    self._folder_id = file_identity(os.stat(self.folder))
                    return  # still ours
        fd = os.open(self.folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise OutboxLocked(
                f"outbox folder {self.folder} is in use by pid {holder}: "
                "each daemon (and each worker) needs a folder of its own (outbox.dir)"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        if self._lock_fd is not None:
            os.close(self._lock_fd)
        self._lock_fd = fd
        self._folder_id = file_identity(os.stat(self.folder))

    def close(self) -> None:
        for fd in (self._fd, self._lock_fd):
            if fd is not None:
                os.close(fd)
        self._fd = self._lock_fd = None

    # -- start-up -------------------------------------------------------------------------------

    def recover(self) -> list[tuple[int, int, Outbound, int]]:
        """Every record not yet confirmed: (segment, end offset, message, frame size).

        Segments wholly before the cursor are deleted, a torn tail is cut off, and appends go
        to a new segment after everything there is."""
        cursor_segment, cursor_offset = self.read_cursor()
        segments = sorted(self.segments())
        found: list[tuple[int, int, Outbound, int]] = []
        for number in segments:
            path = self.path(number)
            if number < cursor_segment:
                path.unlink()
                continue
            data = path.read_bytes()
            records, valid = decode(data)
            if valid < len(data):
                with path.open("r+b") as handle:
                    handle.truncate(valid)
                    handle.flush()
                    os.fsync(handle.fileno())
                self.torn = (path.name, valid, len(data) - valid)
            start = cursor_offset if number == cursor_segment else 0
            previous = 0
            for end, message in records:
                if end > start:
                    found.append((number, end, message, end - previous))
                previous = end
            self._segment_ids[number] = file_identity(os.stat(path))
        self.open_segment(max(segments[-1] if segments else -1, cursor_segment) + 1)
        return found

    def read_cursor(self) -> tuple[int, int]:
        try:
            text = (self.folder / "cursor").read_text().split()
            return int(text[0]), int(text[1])
        except (OSError, ValueError, IndexError):
            return 0, 0

    def write_cursor(self, segment: int, offset: int) -> None:
        temporary = self.folder / "cursor.tmp"
        with temporary.open("w") as handle:
            handle.write(f"{segment} {offset}\n")
            handle.flush()
            os.fsync(handle.fileno())
        temporary.replace(self.folder / "cursor")
        fsync_folder(self.folder)

    def segments(self) -> dict[int, Path]:
        """The segment files in the folder, by number (stray files are ignored)."""
        found = {}
        for path in self.folder.glob("segment-*.log"):
            number = path.stem.removeprefix("segment-")
            if number.isdigit():
                found[int(number)] = path
        return found

    # -- writing --------------------------------------------------------------------------------

    def open_segment(self, number: int) -> None:
        """Switch appends to a new segment ``number``; nothing changes if the open fails."""
        # A raw descriptor, no buffer: after a failed write nothing lingers to be flushed later.
        fd = os.open(self.path(number), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            fsync_folder(self.folder)  # the new file's entry, durably
            identity = file_identity(os.fstat(fd))
            size = os.fstat(fd).st_size
        except OSError:
            os.close(fd)
            raise
        old, self._fd, self.segment, self.segment_size = self._fd, fd, number, size
        self._segment_ids[number] = identity
        self.rotate = False
        if old is not None:
            os.close(old)

    def write(self, data: bytes, sizes: list[int]) -> list[tuple[int, int]]:
        """Append ``data`` (frames of ``sizes``) and fsync; (segment, end offset) of each."""
        if self.segment_size >= SEGMENT_BYTES or self.rotate:
            self.open_segment(self.segment + 1)
        start = self.segment_size
        assert self._fd is not None
        try:
            write_all(self._fd, data)
            os.fsync(self._fd)
        except OSError:
            # Leave no half-written frame behind: a frame after it would be cut off at the next
            # start. If the file cannot be put back as it was, the next write starts a new one.
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, start)
            try:
                self.rotate = os.fstat(self._fd).st_size != start
            except OSError:
                self.rotate = True
            raise
        ends = []
        offset = start
        for size in sizes:
            offset += size
            ends.append((self.segment, offset))
        self.segment_size = offset
        return ends

    def intact(self) -> bool:
        """Whether the folder and every segment that may hold records are still ours: the same
        files, linked where we made them (not deleted, not replaced)."""
        try:
            if file_identity(os.stat(self.folder)) != self._folder_id:
                return False
            if self._fd is not None and os.fstat(self._fd).st_nlink == 0:
                return False
            for number, identity in self._segment_ids.items():
                if file_identity(os.stat(self.path(number))) != identity:
                    return False
        except OSError:
            return False
        return True

    def rewrite(self, frames: list[bytes]) -> list[tuple[int, int]]:
        """The folder is gone or was replaced: make it again, take its lock again, write
        ``frames`` (every record not yet confirmed) into a new segment durably, point the cursor
        at them; (segment, end offset) of each."""
        self.rewrites += 1
        self.lock()  # makes the folder; another daemon may have taken the new one meanwhile
        self._segment_ids.clear()
        next_segment = max([self.segment, *self.segments()]) + 1
        self.open_segment(next_segment)
        ends = self.write(b"".join(frames), [len(f) for f in frames])
        self.write_cursor(next_segment, 0)
        return ends

    def forget_before(self, segment: int) -> None:
        """Delete the segments before ``segment`` (their records are all confirmed)."""
        for number, path in self.segments().items():
            if number < segment and number != self.segment:
                path.unlink(missing_ok=True)
        for number in [n for n in self._segment_ids if n < segment and n != self.segment]:
            del self._segment_ids[number]
