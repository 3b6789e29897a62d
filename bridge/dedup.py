"""Recently seen event ids, bounded by count and by age: the deduplication window.

Used by the receiver (an event id already confirmed is not published again) and by the consumer
helper (an event already handled is not handled again). Memory is bounded by ``size``.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable


class RecentIds:
    def __init__(
        self, size: int, seconds: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.size, self.seconds, self._clock = size, seconds, clock
        self._ids: OrderedDict[str, float] = OrderedDict()

    def _expire(self) -> None:
        oldest_allowed = self._clock() - self.seconds
        while self._ids and next(iter(self._ids.values())) < oldest_allowed:
            self._ids.popitem(last=False)

    def __contains__(self, event_id: object) -> bool:
        self._expire()
        return event_id in self._ids

    def __len__(self) -> int:
        self._expire()
        return len(self._ids)

    def add(self, event_id: str) -> None:
        self._ids[event_id] = self._clock()
        self._ids.move_to_end(event_id)
        while len(self._ids) > self.size:
            self._ids.popitem(last=False)
