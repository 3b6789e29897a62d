"""Reading a stream with the consumer helper: where to start, and where a reader stands.

Owns: the start offsets :class:`bridge.consumer.Consumer` takes as ``offset=`` (``first``,
``last``, ``next``, an offset, a point in time, an age such as ``1h``) checked and turned into the
``x-stream-offset`` consumer argument (RabbitMQ closes the whole connection on an offset string it
does not know, so nothing unchecked reaches it); the same from text, for an environment variable
or a command line (:func:`parse_offset`); and the reader's position: the consumer argument is
kept pointing at the first message not yet handled, so that after a reconnect reading resumes
there, not at the start offset again, and what a reconnect delivers twice is passed over. Does
not: consume, decode, retry or acknowledge (``bridge.consumer`` does), or declare streams
(``type: stream`` in the topology, ``bridge.topology``). Pure: no I/O.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from bridge.topology import MAX_AGE_EXPECTED, max_age_seconds

OFFSET_ARGUMENT = "x-stream-offset"  # the consumer argument, and the header of each message
OFFSET_WORDS = ("first", "last", "next")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)  # an AMQP timestamp is never before it
_MAX_OFFSET = 2**63 - 1

StreamOffset = str | int | datetime | timedelta
"""``first``, ``last``, ``next``; an offset (int >= 0); a timezone-aware datetime; how long ago,
as a :class:`~datetime.timedelta` or a max-age string (``30m``, ``12h``, ``7D``)."""

_EXPECTED = (
    "first, last, next, an offset (a whole number >= 0), a point in time with its time zone "
    f"(2025-01-31T08:00:00+00:00) or how long ago ({MAX_AGE_EXPECTED})"
)


def offset_argument(offset: StreamOffset) -> str | int | datetime:
    """The ``x-stream-offset`` value for a start offset; :class:`ValueError` when it is none.

    How long ago (a timedelta or ``12h``) becomes a point in time now, on this clock, so that it
    does not move when the consumer reconnects. Points in time go to the broker to the second
    (AMQP 0-9-1 timestamps); it starts at the chunk (a batch of messages) holding that second.
    """
    if isinstance(offset, int) and not isinstance(offset, bool) and 0 <= offset <= _MAX_OFFSET:
        return offset
    if isinstance(offset, datetime) and offset.utcoffset() is not None:
        return max(offset, _EPOCH)
    if isinstance(offset, timedelta) and offset >= timedelta(0):
        return _ago(offset.total_seconds())
    if isinstance(offset, str) and offset in OFFSET_WORDS:
        return offset
    if isinstance(offset, str):
        try:
            return _ago(max_age_seconds(offset))
        except ValueError:
            pass
    raise ValueError(f"expected {_EXPECTED}, got {offset!r}")


def _ago(seconds: float) -> datetime:
    now = datetime.now(UTC)
    return now - timedelta(seconds=seconds) if seconds < now.timestamp() else _EPOCH


def parse_offset(text: str) -> StreamOffset:
    """A start offset from text: ``first``, ``last``, ``next``, ``1234``, ``12h`` or an ISO 8601
    time with its zone (``2025-01-31T08:00:00Z``); :class:`ValueError` for anything else."""
    text = text.strip()
    if text.isascii() and text.isdigit():
        return int(text)
    if text in OFFSET_WORDS:
        return text
    try:
        max_age_seconds(text)
    except ValueError:
        pass
    else:
        return text
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        moment = None
    if moment is None or moment.utcoffset() is None:  # a time without its zone is ambiguous
        raise ValueError(f"expected {_EXPECTED}, got {text!r}")
    return moment


def message_offset(headers: dict[str, Any] | None) -> int | None:
    """The offset of a message read from a stream (its ``x-stream-offset`` header)."""
    value = (headers or {}).get(OFFSET_ARGUMENT)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class StreamPosition:
    """Where a reader stands in one stream.

    :attr:`arguments` are the consumer's arguments; aio-pika consumes again with this very dict
    after a reconnect, so keeping its offset at the first message not yet handled resumes
    reading there. Should a reconnect deliver from further back all the same, :meth:`take`
    passes over what was handled already.
    """

    def __init__(self, offset: StreamOffset) -> None:
        self.arguments: dict[str, Any] = {OFFSET_ARGUMENT: offset_argument(offset)}
        self._pending: set[int] = set()  # delivered, not handled yet (or cut short)
        self._next: int | None = None  # just past the last offset delivered
        self.passed_over = 0  # messages delivered again after a reconnect, and not handled

    def take(self, offset: int | None) -> bool:
        """Whether to handle the message at ``offset``: False for one handled before."""
        if offset is None:
            return True
        if self._next is not None and offset < self._next and offset not in self._pending:
            self.passed_over += 1
            return False
        self._pending.add(offset)
        self._next = offset + 1 if self._next is None else max(self._next, offset + 1)
        self._resume()
        return True

    def done(self, offset: int | None) -> None:
        """The message at ``offset`` is handled (or given up): never read it again."""
        if offset is not None:
            self._pending.discard(offset)
            self._resume()

    @property
    def resume_at(self) -> int | str | datetime:
        """The offset a reconnect reads from: the first one not handled yet."""
        value: int | str | datetime = self.arguments[OFFSET_ARGUMENT]
        return value

    def _resume(self) -> None:
        if self._next is not None:
            self.arguments[OFFSET_ARGUMENT] = min(self._pending, default=self._next)
