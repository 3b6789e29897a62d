"""The outbox's spool: its records in memory and every piece of work on its files, none awaiting.

Everything here is synchronous. What touches the disk (said *in a thread* below) is called by
``bridge.outbox`` through ``asyncio.to_thread``, one at a time under its files' lock; the rest
runs on the loop and only changes records in memory. The files' format and durability are
``bridge.segments``; what is sent, and when, is ``bridge.replayer``.

- :class:`Record`: one event waiting for its confirm, where it is on disk and what the replayer
  knows of it (a publish in doubt, refusals, poison).
- :class:`Spool`: the records, the bytes they take (``outbox.max_bytes``), and the group commit
  (one write and one ``fsync`` per batch), the rewrite of a lost folder, the cursor and the
  recycling of segments once everything is confirmed.
- :class:`QuarantineFile`: ``quarantine.log``, records the broker refuses for what they are, and
  :func:`read_quarantine` for ``events-bridge quarantine``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from bridge.message import Outbound
from bridge.segments import (
    SegmentLog,
    decode_with_meta,
    encode,
    file_identity,
    fsync_folder,
    make_folder,
    write_all,
)

QUARANTINE_FILE: Final = "quarantine.log"

# Where a record ends on disk: (segment number, offset just past it).
Position = tuple[int, int]


@dataclass(eq=False)
class Record:
    segment: int
    end: int  # offset just past the record in its segment
    message: Outbound
    size: int
    doubt: asyncio.Future[Any] | None = None  # the open confirm of a publish that timed out
    settled: bool = False  # confirmed or quarantined: forgotten once those before it are
    strikes: int = 0  # closes of the channel over it, sent alone
    failures: int = 0  # other failed publishes of it (nacks, returns)
    poison: tuple[str, str] | None = None  # (kind, reason): never sent again; for the quarantine


class Spool:
    """The records not yet confirmed, oldest first, and the files that keep them."""

    def __init__(self, folder: Path, max_bytes: int) -> None:
        self.files = SegmentLog(folder)
        self.quarantine_file = QuarantineFile(folder)
        self.max_bytes = max_bytes
        self.records: deque[Record] = deque()
        self.held_bytes = 0  # of the records, and of the appends being written
        # A record was written again behind the others (the replayer's requeue): the oldest
        # record is then not always the first, until the spool is empty again.
        self.requeued = False

    @property
    def folder(self) -> Path:
        return self.files.folder

    def head(self) -> Record | None:
        """The oldest record not settled."""
        return next((r for r in self.records if not r.settled), None)

    # -- start-up and end (in a thread) ---------------------------------------------------------

    def open(self) -> None:
        """Take the folder's lock, then hold what a previous run left (nothing else runs yet)."""
        self.files.lock()  # before anything is read: another daemon's records are not ours
        for segment, end, message, size in self.files.recover():
            self.records.append(Record(segment, end, message, size))
            self.held_bytes += size

    def close(self) -> None:
        self.quarantine_file.close()
        self.files.close()  # releases the folder's lock

    # -- the group commit -----------------------------------------------------------------------

    def reserve(self, size: int) -> bool:
        """Count ``size`` more bytes as held, if the bound allows (on the loop, before the write,
        so that concurrent appends cannot overshoot it)."""
        if self.held_bytes + size > self.max_bytes:
            return False
        self.held_bytes += size
        return True

    def release(self, size: int) -> None:
        """What was reserved for a write that failed."""
        self.held_bytes -= size

    def write(self, frames: list[bytes]) -> list[Position] | None:
        """Write and fsync (in a thread); the position of every frame, or None when the folder or
        a segment is no longer ours (the frames are then not safe)."""
        try:
            ends = self.files.write(b"".join(frames), [len(f) for f in frames])
        except FileNotFoundError:  # a new segment could not be made: the folder is gone
            return None
        return ends if self.files.intact() else None

    def hold(
        self,
        ends: list[Position],
        frames: list[bytes],
        messages: Iterable[Outbound],
        doubts: Iterable[asyncio.Future[Any] | None],
    ) -> list[Record]:
        """The records of frames written at ``ends``, now held after the others."""
        records = [
            Record(segment, end, message, len(frame), doubt)
            for (segment, end), frame, message, doubt in zip(
                ends, frames, messages, doubts, strict=True
            )
        ]
        self.records.extend(records)
        return records

    # -- a folder lost: everything held, written again ------------------------------------------

    def to_rewrite(self) -> tuple[list[Record], list[bytes]]:
        """What a rewrite writes again (on the loop: the loop settles records meanwhile): every
        record not settled, and its frame."""
        held = [r for r in self.records if not r.settled]
        return held, [encode(r.message) for r in held]

    def rewrite(self, frames: list[bytes]) -> list[Position]:
        """Make the folder again and write ``frames`` into it (in a thread)."""
        return self.files.rewrite(frames)

    def rewritten(self, held: list[Record], frames: list[bytes], ends: list[Position]) -> None:
        """``held`` (of ``frames``) now ends at ``ends``: every record takes its new place."""
        written = dict(zip(map(id, held), zip(frames, ends, strict=False), strict=True))
        position = (ends[0][0], 0) if ends else (self.files.segment, 0)
        for record in self.records:
            # What was not written again (settled) takes the place of the record before it,
            # so the cursor only ever moves forward.
            entry = written.get(id(record))
            if entry is not None:
                frame, position = entry
                self.held_bytes += len(frame) - record.size
                record.size = len(frame)
            record.segment, record.end = position

    def intact(self) -> bool:
        """Whether the folder and its segments are still ours (in a thread)."""
        return self.files.intact()

    # -- forgetting what is confirmed -----------------------------------------------------------

    def forget_settled(self) -> Record | None:
        """Drop the settled records at the front (on the loop); the last one dropped, if any."""
        last = None
        while self.records and self.records[0].settled:
            last = self.records.popleft()
            self.held_bytes -= last.size
        return last

    def move_cursor(self, past: Record) -> None:
        """Point the cursor just past ``past`` and delete the segments before it (in a thread)."""
        self.files.write_cursor(past.segment, past.end)
        self.files.forget_before(past.segment)

    @property
    def recyclable(self) -> bool:
        """Nothing is held and the current segment is not empty: time for a fresh one."""
        return not self.records and self.files.segment_size != 0

    def recycle(self) -> int:
        """Move to a new segment and delete the old ones, so the space they take (a full disk,
        maybe) is free for the next outage (in a thread); the number of the old one."""
        old = self.files.segment
        self.files.open_segment(old + 1)
        self.files.forget_before(self.files.segment)
        self.files.write_cursor(self.files.segment, 0)
        return old


class QuarantineFile:
    """``quarantine.log``: records the broker refuses for what they are, each with its reason,
    appended durably and never replayed (``events-bridge quarantine`` lists them).

    The file is held open, so that should it be deleted or its folder replaced, what it held is
    copied from the open descriptor into a new one at the next append."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._fd: int | None = None
        self._id: tuple[int, int] | None = None

    @property
    def path(self) -> Path:
        return self.folder / QUARANTINE_FILE

    def add(self, frames: list[bytes]) -> None:
        if self._fd is None or not self._intact():
            self._reopen()
        assert self._fd is not None
        size = os.fstat(self._fd).st_size
        try:
            write_all(self._fd, b"".join(frames))
            os.fsync(self._fd)
        except OSError:
            # No half-written frame left behind: it would hide every record after it.
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, size)
            raise

    def keep(self) -> None:
        """If the file was deleted or replaced, write what it held into a new one now."""
        if self._fd is not None and not self._intact():
            self._reopen()

    def _intact(self) -> bool:
        try:
            return file_identity(os.stat(self.path)) == self._id
        except OSError:
            return False

    def _reopen(self) -> None:
        kept = b""
        if self._fd is not None:  # deleted under us: what it held is still readable here
            kept = os.pread(self._fd, os.fstat(self._fd).st_size, 0)
            os.close(self._fd)
            self._fd = None
        make_folder(self.folder)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        if not kept:  # the first open: a torn tail (a crash mid-write) would hide what follows
            data = os.pread(fd, os.fstat(fd).st_size, 0)
            valid = decode_with_meta(data)[1]
            if valid < len(data):
                os.ftruncate(fd, valid)
                os.fsync(fd)
        if kept:
            write_all(fd, kept)
            os.fsync(fd)
        fsync_folder(self.folder)
        self._fd, self._id = fd, file_identity(os.fstat(fd))

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def read_quarantine(folder: Path) -> list[tuple[Outbound, dict[str, Any]]]:
    """The quarantined records in ``folder`` with their meta (reason, quarantined_at)."""
    try:
        data = (folder / QUARANTINE_FILE).read_bytes()
    except FileNotFoundError:
        return []
    return [(message, meta) for _, message, meta in decode_with_meta(data)[0]]
