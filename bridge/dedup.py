"""Recently seen event ids, bounded by count and by age: the deduplication window.

Used by the receiver (an event id already confirmed is not published again) and by the consumer
helper (an event already handled is not handled again).

Its memory is taken in full when it is made, and then stays flat: ``size`` slots in a ring, each
holding a 16-byte digest of an id (so every key has the same size) and the time it was added,
filled at the start with placeholders. Adding an id replaces the oldest slot; an id older than
``seconds`` no longer counts as seen. A daemon's memory under steady load therefore does not
creep up while the window fills, and a leak cannot hide behind it (``make bench``, scenario e).
About 190 bytes per slot: 19 MB for the default 100,000, made in about half a second.

Two ids with the same 128-bit BLAKE2b digest would be taken for one another; the chance is
about n²/2¹²⁹, nil for any n that fits in memory.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from collections.abc import Callable

DIGEST_BYTES = 16


def _digest(event_id: str) -> bytes:
    return hashlib.blake2b(event_id.encode(errors="surrogatepass"), digest_size=16).digest()


class RecentIds:
    def __init__(
        self, size: int, seconds: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.size, self.seconds, self._clock = size, seconds, clock
        # Placeholders: random digests (never an id's) with distinct times long past, so the
        # table, the keys and the times all have their final size from the start.
        self._ring = [os.urandom(DIGEST_BYTES) for _ in range(size)]
        self._added: dict[bytes, float] = {key: -1.0 - n for n, key in enumerate(self._ring)}
        self._next = 0
        # A dict that has items taken out and put in settles at a larger table than one that
        # was only filled: churn placeholders once through that resize now, not under load.
        filled = sys.getsizeof(self._added)
        for n in range(3 * size):
            if sys.getsizeof(self._added) != filled:
                break
            self._replace(os.urandom(DIGEST_BYTES), -1.0 - size - n)

    def _replace(self, key: bytes, added: float) -> None:
        """Put ``key`` in the oldest slot."""
        self._added.pop(self._ring[self._next], None)
        self._ring[self._next] = key
        self._added[key] = added
        self._next = (self._next + 1) % self.size

    @staticmethod
    def key(event_id: str) -> bytes:
        """The digest that stands for ``event_id``: made once, to ask :meth:`seen` and then to
        :meth:`remember` it."""
        return _digest(event_id)

    def seen(self, key: bytes) -> bool:
        added = self._added.get(key)
        return added is not None and added >= self._clock() - self.seconds

    def remember(self, key: bytes) -> None:
        if key in self._added:  # seen again: only its time moves
            self._added[key] = self._clock()
            return
        self._replace(key, self._clock())

    def __contains__(self, event_id: object) -> bool:
        return isinstance(event_id, str) and self.seen(_digest(event_id))

    def __len__(self) -> int:
        """How many ids currently count as seen (a scan: for tests and diagnostics)."""
        oldest = self._clock() - self.seconds
        return sum(1 for added in self._added.values() if added >= oldest)

    def add(self, event_id: str) -> None:
        self.remember(_digest(event_id))
