"""Adobe's Journaling API, the protocol: pages, links, start points, waits. Pure.

What Adobe documents (ADOBE-EVENTS.md §5, from Adobe's "Journaling API" guide and its SDKs): a
journal is read with ``GET <journal url>`` and the query ``limit``, ``since=<position>``
(exclusive), ``seek=-PT2H`` (a negative ISO-8601 duration) or ``latest=true``; no query starts
at the oldest event kept (7 days). A ``200`` page is ``{"events": [{"position", "event"}],
"_page": {"last", "count"}}`` with ``Link: <relative url>; rel="next"``; ``204`` is the end for
now, with ``retry-after``; ``410`` a position that expired. A page is at most 1.5 MB.

Owns: reading a page (bounded: its size is capped before it is read, and every entry is checked
for shape), the ``Link`` header, resolving ``next`` against the journal's own origin (never
another host: the next request carries our token), the start points, ``retry-after``.
Does not: send requests (``bridge.journal``), or know what an event means
(``bridge.adobe.envelope``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any, Final
from urllib.parse import parse_qsl, urlencode, urljoin, urlsplit, urlunsplit

import orjson

PAGE_CAP_BYTES: Final = 1_500_000  # Adobe's cap on one page
MAX_PAGE_BYTES: Final = 4 * 1024 * 1024  # what is read of one answer at most, with room to spare
RETENTION: Final = timedelta(days=7)  # how long Adobe keeps a journal's events
START_WORDS: Final = ("oldest", "latest")
MAX_WAIT: Final = 300.0  # seconds: a retry-after beyond this is read as this

_SEEK = re.compile(
    r"^-P(?:(?P<d>\d{1,3})D)?(?:T(?:(?P<h>\d{1,4})H)?(?:(?P<m>\d{1,6})M)?(?:(?P<s>\d{1,7})S)?)?$"
)
_LINK = re.compile(r'<([^>]*)>\s*((?:;\s*[A-Za-z*-]+\s*=\s*(?:"[^"]*"|[^;,\s]+)\s*)*)')
_REL = re.compile(r';\s*rel\s*=\s*(?:"([^"]*)"|([^;,\s]+))', re.IGNORECASE)
_TIME_PATHS = (("time",), ("event", "activitystreams:published"), ("event_time",))


class JournalProblem(ValueError):
    """An answer of the journal that cannot be used as it is: ``kind`` names it for the metric
    of errors, ``detail`` says what, in one line."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind, self.detail = kind, detail


@dataclass(frozen=True)
class Entry:
    """One event of a page: its position, its bytes (the event object, as Adobe gives it, in
    compact JSON) and its time when it says one."""

    position: str
    body: bytes
    time: datetime | None


@dataclass(frozen=True)
class Page:
    entries: tuple[Entry, ...]
    last: str | None  # the position to resume after: ``_page.last``, else the last entry's


def seek_duration(text: str) -> timedelta | None:
    """``-PT2H``, ``-P1D``, ``-P1DT30M`` as a duration, or None when ``text`` is not one of
    those (Adobe takes days, hours, minutes and seconds; nothing longer than it keeps)."""
    match = _SEEK.match(text.strip())
    if match is None or not any(match.groupdict().values()) or text.strip().endswith("T"):
        return None
    parts = {k: int(v) for k, v in match.groupdict().items() if v is not None}
    duration = timedelta(
        days=parts.get("d", 0),
        hours=parts.get("h", 0),
        minutes=parts.get("m", 0),
        seconds=parts.get("s", 0),
    )
    return duration if timedelta(0) < duration <= RETENTION else None


def start_query(start: str) -> dict[str, str]:
    """The query of a start point: ``oldest`` (none), ``latest`` or a ``seek`` duration."""
    if start == "oldest":
        return {}
    if start == "latest":
        return {"latest": "true"}
    if seek_duration(start) is None:
        raise ValueError(f"not a start point: {start!r}")
    return {"seek": start.strip()}


def with_query(url: str, **params: str | int | None) -> str:
    """``url`` with ``params`` set (None: removed), its other parameters kept."""
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k not in params]
    query += [(k, str(v)) for k, v in params.items() if v is not None]
    return urlunsplit(parts._replace(query=urlencode(query)))


def query_value(url: str, name: str) -> str | None:
    found = [v for k, v in parse_qsl(urlsplit(url).query) if k == name]
    return found[-1] if found else None


def links(header: str | None) -> dict[str, str]:
    """The ``Link`` header's targets by relation (``next``, ``validate``...): RFC 8288's
    syntax, as far as Adobe uses it."""
    found: dict[str, str] = {}
    for match in _LINK.finditer(header or ""):
        rel = _REL.search(match.group(2))
        if rel is not None:
            for name in (rel.group(1) or rel.group(2) or "").split():
                found.setdefault(name.lower(), match.group(1).strip())
    return found


def origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme.lower(), parts.netloc.lower()


def resolve(base: str, reference: str) -> str:
    """``reference`` (Adobe's links are relative) against ``base``; a link to another origin is
    a :class:`JournalProblem`: the next request would carry our token there."""
    try:
        url = urljoin(base, reference)
        elsewhere = origin(url) != origin(base)
    except ValueError:  # urljoin and urlsplit refuse some references: "//[bad/x"
        raise JournalProblem("bad_link", "a next link that is not a URL: not followed") from None
    if elsewhere:
        raise JournalProblem(
            "bad_link", f"a next link to another host ({origin(url)[1]}): not followed"
        )
    return url


def retry_after(value: str | None, default: float, now: datetime) -> float:
    """Seconds to wait by a ``retry-after`` header (seconds or an HTTP date), within
    [0, :data:`MAX_WAIT`]; ``default`` when absent or unreadable."""
    if value is None or not value.strip():
        return default
    text = value.strip()
    try:
        seconds = float(text) if text.replace(".", "", 1).isdigit() else None
    except ValueError:
        seconds = None
    if seconds is None:
        try:
            seconds = (parsedate_to_datetime(text) - now).total_seconds()
        except (TypeError, ValueError, IndexError, OverflowError):
            return default
    return min(max(seconds, 0.0), MAX_WAIT)


def parse_page(body: bytes) -> Page:
    """A ``200`` answer's body as a :class:`Page`, or a :class:`JournalProblem` (``bad_page``)
    saying what is wrong with it."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise JournalProblem("bad_page", f"a page that is not JSON: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("events"), list):
        raise JournalProblem("bad_page", "a page without an events list")
    entries = tuple(_entry(item, n) for n, item in enumerate(doc["events"]))
    page = doc.get("_page")
    last = page.get("last") if isinstance(page, dict) else None
    if not isinstance(last, str) or not last:
        last = entries[-1].position if entries else None
    return Page(entries, last)


def _entry(item: Any, n: int) -> Entry:
    if not isinstance(item, dict):
        raise JournalProblem("bad_page", f"events[{n}] is not an object")
    position, event = item.get("position"), item.get("event")
    if not isinstance(position, str) or not position or len(position) > 1024:
        raise JournalProblem("bad_page", f"events[{n}] has no position")
    if not isinstance(event, dict):
        raise JournalProblem("bad_page", f"events[{n}] has no event object")
    return Entry(position, orjson.dumps(event), event_time(event))


def event_time(event: dict[str, Any]) -> datetime | None:
    """When the event happened, where its format says (CloudEvents ``time``, ``adobe_io``'s
    ``activitystreams:published``), as an aware datetime; None when it says nowhere."""
    for path in _TIME_PATHS:
        value: Any = event
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        if isinstance(value, str) and 10 <= len(value) <= 64:
            try:
                found = datetime.fromisoformat(value.replace("Z", "+00:00"))
            except ValueError:
                continue
            if found.tzinfo is not None:
                return found
    return None
