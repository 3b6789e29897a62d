"""The journal's position, kept across restarts: written only once every event up to it is safe,
durably (write a temporary file, fsync it, rename it over the old one, fsync the folder), so a
crash leaves the old position or the new one, never half of one.

A crash between the publish and the write gives the page again at the next start: duplicates
(at most a page, and the dedup window takes those it remembers), never a gap. One file per
journal URL (``position-<digest>.json``), so pointing the bridge at another journal does not
resume at a position of the first. A lock (``flock``) on ``<state_dir>/.lock`` keeps two
writers apart: a second daemon, or ``events-bridge journal`` while ``serve`` pulls.

Owns: the file and its lock. Does not: decide when a position is safe (``bridge.journal``).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

import orjson

VERSION: Final = 1
MAX_FILE_BYTES: Final = 64 * 1024


class StateUnavailable(OSError):
    """The state folder cannot be used: not writable, or locked by another process."""


class Checkpoint:
    """The kept position of the journal at ``journal_url``, in ``folder``."""

    def __init__(self, folder: Path, journal_url: str) -> None:
        self.folder, self.journal_url = folder, journal_url
        digest = hashlib.sha256(journal_url.encode()).hexdigest()[:16]
        self.file = folder / f"position-{digest}.json"
        self._lock: int | None = None

    def open(self) -> None:
        """Take the folder's lock; :class:`StateUnavailable` when it cannot be had."""
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.folder / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise StateUnavailable(f"journal state folder {self.folder}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise StateUnavailable(
                f"journal state folder {self.folder} is in use by another process "
                "(a running `serve` pulls this journal)"
            ) from None
        self._lock = fd

    def close(self) -> None:
        if self._lock is not None:
            os.close(self._lock)  # and with it the lock
            self._lock = None

    def load(self) -> str | None:
        """The kept position, or None when there is none (or it is unreadable: then a
        :class:`StateUnavailable`, which the caller reports; it never guesses a position)."""
        try:
            with self.file.open("rb") as f:
                raw = f.read(MAX_FILE_BYTES + 1)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StateUnavailable(f"cannot read {self.file}: {exc.strerror}") from None
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError:
            doc = None
        position = doc.get("position") if isinstance(doc, dict) else None
        if not isinstance(position, str) or not position:
            raise StateUnavailable(f"{self.file} holds no position: move it away to start anew")
        return position

    def save(self, position: str) -> None:
        """Keep ``position`` durably (blocking: call it in a thread from the loop)."""
        doc = {
            "version": VERSION,
            "journal": self.journal_url,
            "position": position,
            "saved_at": datetime.now(UTC).isoformat(timespec="milliseconds"),
        }
        temporary = self.file.with_suffix(".tmp")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, orjson.dumps(doc, option=orjson.OPT_APPEND_NEWLINE))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, self.file)
        folder = os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
