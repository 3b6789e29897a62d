"""The journal reader: pulls a registration's journal from Adobe, page after page, and hands each
page to a taker (the road: ``bridge.journal_intake``; ``journal --dry-run``: a printer).

The loop, as Adobe's Journaling API asks (``bridge.adobe.journal`` has the protocol):

- ``200``: the page's events are made safe, then its position is kept (``bridge.checkpoint``),
  then the ``Link rel="next"`` is followed. A page not made safe (the broker down and no
  outbox) is read again after a pause; the position never runs ahead of what is safe. A page
  that a subscriber-defined filter left empty moves on all the same; an empty page whose next
  link does not move on is the end, as a ``204``.
- ``204``: the end for now; wait ``retry-after`` (``--until-end``: stop), follow ``next``.
- ``401``: the token is renewed at once, once; ``429`` and ``5xx``: back off (``retry-after``
  when given, else 1 s doubling to 60 s, with jitter); ``410`` to a ``since``: the position
  expired (7 days), so start again from the oldest event kept, with a warning; other answers:
  back off and log. No wait is shorter than :data:`MIN_WAIT`, whatever ``retry-after`` says.
- :meth:`JournalReader.stop` ends a request still unanswered at once (no page is in hand).
- A page larger than :data:`~bridge.adobe.journal.MAX_PAGE_BYTES` is not read: the ``limit``
  is halved for the next try (and grows back by a quarter after each good page).

Errors never end ``serve``'s reader (the webhooks go on; ``/readyz`` does not look at it), and
not even a bug does: :func:`run_reader` counts it and runs the reader again.
``events-bridge journal`` ends, with one line, on the ones a retry cannot mend (``fatal``).

Owns: the loop, its waits, its metrics. Does not: parse events or publish.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Awaitable, Callable, Collection, Coroutine, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Final, TypeVar

import aiohttp
import structlog

from bridge import __version__, metrics
from bridge.adobe.journal import (
    MAX_PAGE_BYTES,
    JournalProblem,
    Page,
    links,
    parse_page,
    query_value,
    resolve,
    retry_after,
    start_query,
    with_query,
)
from bridge.checkpoint import Checkpoint
from bridge.config_types import JournalConfig
from bridge.ims import Tokens, problem_text

log = structlog.get_logger("bridge.journal")

MIN_BACKOFF: Final = 1.0
MAX_BACKOFF: Final = 60.0
END_WAIT: Final = 10.0  # seconds after a 204 that says no retry-after (Adobe says 10)
MIN_WAIT: Final = 0.5  # seconds: the shortest pause a retry-after (0, a past date) can ask for
EMPTY_BURST: Final = 10  # empty pages in a row followed at once; then MIN_WAIT between them
RESTART_WAIT: Final = 5.0  # seconds before serve's reader runs again after a bug
MAX_RESTART_WAIT: Final = 300.0
_NOWHERE: Final = "\0no failure yet"  # no journal position looks like it
ACCEPT: Final = "application/vnd.adobecloud.events+json, application/json"
# For a one-shot reader, the problems no retry mends:
FATAL: Final = frozenset({"rejected", "unauthorized", "token", "bad_link"})

Taker = Callable[[Page], Awaitable[bool]]
T = TypeVar("T")


class JournalFailed(Exception):
    """A one-shot reader met a problem that waiting does not mend."""


@dataclass
class Progress:
    """What the reader has done, for the progress line and the closing summary."""

    events: int = 0
    pages: int = 0
    position: str | None = None
    started: float = field(default_factory=time.monotonic)
    newest: datetime | None = None

    @property
    def rate(self) -> float:
        return self.events / max(time.monotonic() - self.started, 1e-3)


def first_url(config: JournalConfig, since: str | None, start: str) -> str:
    """Where to begin: after ``since`` (a kept or given position), else at ``start``."""
    query = {"since": since} if since else start_query(start)
    return with_query(config.url, limit=config.limit, **query)


class JournalReader:
    """Reads the journal at ``url`` until :meth:`stop` (or its end, with ``until_end``)."""

    def __init__(
        self,
        config: JournalConfig,
        url: str,
        take: Taker,
        checkpoint: Checkpoint | None = None,
        *,
        until_end: bool = False,
        fatal: Collection[str] = (),
        on_progress: Callable[[Progress], None] | None = None,
    ) -> None:
        self.config, self.url, self.take, self.checkpoint = config, url, take, checkpoint
        self.until_end, self.fatal, self.on_progress = until_end, frozenset(fatal), on_progress
        self.progress = Progress(position=query_value(url, "since"))
        self._limit = config.limit
        self._backoff = MIN_BACKOFF
        self._unauthorized = 0
        self._empties = 0  # empty pages in a row that moved on
        self._stopping = asyncio.Event()
        # The position read from the state file, if this reader started at one.
        self._kept_start = query_value(url, "since") if checkpoint is not None else None

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> Progress:
        """Read until stopped, or (``until_end``) the end; a fatal problem raises
        :class:`JournalFailed`."""
        headers = {"User-Agent": f"events-bridge/{__version__}"}
        proxy = self.config.proxy or None  # IMS's token requests take it too
        async with aiohttp.ClientSession(headers=headers, trust_env=False, proxy=proxy) as session:
            tokens = Tokens(self.config.ims, session, timeout=self.config.timeout)
            while not self._stopping.is_set():
                try:
                    wait = await self._step(session, tokens)
                except JournalProblem as problem:
                    wait = self._failed(problem.kind, problem.detail)
                if wait is None:
                    break
                if wait > 0:
                    await self._sleep(wait)
        return self.progress

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    async def pause(self, seconds: float) -> bool:
        """Wait ``seconds``, or less if :meth:`stop` comes first; True when stopped."""
        await self._sleep(seconds)
        return self._stopping.is_set()

    async def _step(self, session: aiohttp.ClientSession, tokens: Tokens) -> float | None:
        """One request and what follows from its answer; the seconds to wait before the next
        (None: done)."""
        url = with_query(self.url, limit=self._limit)
        asked = await self._unless_stopped(self._ask(session, tokens, url))
        if asked is None:  # stopped while Adobe (or IMS) had not answered: no page in hand
            return None
        token, status, said, link, body = asked
        if status != 401:
            self._unauthorized = 0
        wait_said = said.get("retry-after")
        if status == 200:
            return await self._page(url, body, link)
        if status == 204:
            return await self._end(url, link, wait_said)
        if status == 401:
            tokens.rejected(token)
            self._unauthorized += 1
            if self._unauthorized == 1:
                metrics.JOURNAL_ERRORS.labels("unauthorized").inc()
                return 0.0  # a token that expired early: a new one, at once
            return self._failed("unauthorized", "the journal refused a fresh token (401)")
        if status == 410 and query_value(url, "since"):  # only a position expires
            return self._expired()
        if status == 429 or status >= 500:
            kind = "throttled" if status == 429 else "server"
            return self._failed(kind, f"the journal answered {status}", wait_said)
        since = query_value(url, "since")
        detail = f"the journal answered {status}"
        if status == 400 and since:  # Adobe's answer to a position it does not know
            detail += f" to the position {since}"
            if self.checkpoint is not None and since == self._kept_start:
                detail += f" (kept in {self.checkpoint.file}): if it is not this journal's,"
                detail += " remove the file to start again at journal.start"
        return self._failed("rejected", detail)

    async def _ask(
        self, session: aiohttp.ClientSession, tokens: Tokens, url: str
    ) -> tuple[str, int, Mapping[str, str], dict[str, str], bytes]:
        """The token sent, and the answer: status, headers, links, body (a ``200``'s only)."""
        token = await tokens.token()
        ims = self.config.ims
        headers = {
            "Authorization": f"Bearer {token}",
            "x-api-key": ims.client_id,
            "x-ims-org-id": ims.org_id,
            "Accept": ACCEPT,
        }
        try:
            async with session.get(
                url,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=self.config.timeout),
                allow_redirects=False,
            ) as answer:
                status, said = answer.status, answer.headers
                link = links(", ".join(said.getall("Link", [])))
                body = await _read(answer) if status == 200 else b""
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            detail = f"journal request failed: {problem_text(exc)}"
            raise JournalProblem("network", detail) from None
        return token, status, said, link, body

    async def _unless_stopped(self, work: Coroutine[object, object, T]) -> T | None:
        """``work``'s result, or None once :meth:`stop` comes first (``work`` is cancelled)."""
        task = asyncio.ensure_future(work)
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        return task.result() if not task.cancelled() else None

    async def _page(self, url: str, body: bytes, link: dict[str, str]) -> float | None:
        page = parse_page(body)
        self._newest(page)
        if not page.entries:  # the end, unless its next link moves on (a filtered page)
            return await self._empty(url, link)
        if not await self.take(page):
            return self._failed("deliver", "the page's events are not safe yet", quiet=True)
        self._empties = 0
        metrics.JOURNAL_PAGES.labels("events").inc()
        metrics.JOURNAL_EVENTS.inc(len(page.entries))
        progress = self.progress
        progress.pages += 1
        progress.events += len(page.entries)
        if page.last is not None:
            await self._keep(page.last)
        after = with_query(url, since=page.last, latest=None, seek=None)
        following = link.get("next")
        try:
            self.url = resolve(url, following) if following else after
        except JournalProblem as problem:  # a link elsewhere: not followed, and not re-read
            self._failed(problem.kind, problem.detail)
            self.url = after
        self._limit = min(self._limit + max(self._limit // 4, 1), self.config.limit)
        self._backoff = MIN_BACKOFF
        self._report()
        return 0.0

    async def _end(self, url: str, link: dict[str, str], wait_said: str | None) -> float | None:
        self._empties = 0
        metrics.JOURNAL_PAGES.labels("empty").inc()
        self._newest(None)
        following = link.get("next")
        if following:
            self.url = resolve(url, following)
            # After `latest` or `seek`, the next link names the end as a position: keep it, so
            # a restart resumes there and not at a later "latest".
            since = query_value(self.url, "since")
            if since and since != self.progress.position:
                await self._keep(since)
        self._backoff = MIN_BACKOFF
        self._report()
        if self.until_end:
            return None
        return max(retry_after(wait_said, END_WAIT, datetime.now(UTC)), MIN_WAIT)

    async def _empty(self, url: str, link: dict[str, str]) -> float | None:
        """An empty ``200``: a subscriber-defined filter can leave a page with no event and a
        next position (followed at once, and kept); any other is the end, as a ``204``."""
        following = link.get("next")
        onward = resolve(url, following) if following else url
        since = query_value(onward, "since")
        if not since or since == query_value(url, "since"):
            return await self._end(url, link, None)
        metrics.JOURNAL_PAGES.labels("empty").inc()
        self.url = onward
        await self._keep(since)
        self._report()
        self._empties += 1  # on at once, but not flat out through a journal of empty pages
        return MIN_WAIT if self._empties > EMPTY_BURST else 0.0

    def _expired(self) -> float:
        metrics.JOURNAL_ERRORS.labels("expired").inc()
        log.warning(
            "journal_position_expired",
            position=self.progress.position,
            detail="Adobe keeps a journal 7 days: the events between that position and the "
            "oldest kept one are gone from the journal",
            action="reading on from the oldest event kept",
        )
        self.url = with_query(self.config.url, limit=self._limit)
        return 0.0

    def _failed(
        self, kind: str, detail: str, wait_said: str | None = None, *, quiet: bool = False
    ) -> float:
        """Count and log a problem; the seconds to back off (a fatal one raises)."""
        if kind == "page_too_large" and self._limit > 1:
            self._limit = max(self._limit // 2, 1)
        if kind in self.fatal:
            raise JournalFailed(detail)
        backoff = self._backoff * random.uniform(0.8, 1.2)  # noqa: S311
        wait = max(retry_after(wait_said, backoff, datetime.now(UTC)), MIN_WAIT)
        self._backoff = min(self._backoff * 2, MAX_BACKOFF)
        if not quiet:
            metrics.JOURNAL_ERRORS.labels(kind).inc()
            log.warning("journal_problem", kind=kind, detail=detail, retry_in=round(wait, 1))
        return wait

    async def _keep(self, position: str) -> None:
        self.progress.position = position
        if self.checkpoint is None:
            return
        try:
            await asyncio.to_thread(self.checkpoint.save, position)
        except OSError as exc:
            # The events are safe; only a restart would read this page again (duplicates).
            metrics.JOURNAL_ERRORS.labels("state").inc()
            log.error("journal_position_not_kept", file=str(self.checkpoint.file), reason=str(exc))

    def _newest(self, page: Page | None) -> None:
        times = [e.time for e in page.entries if e.time is not None] if page else []
        progress = self.progress
        if times and (progress.newest is None or max(times) > progress.newest):
            progress.newest = max(times)
        if progress.newest is not None:
            age = (datetime.now(UTC) - progress.newest).total_seconds()
            metrics.JOURNAL_NEWEST_AGE.set(max(age, 0.0))

    def _report(self) -> None:
        if self.on_progress is not None:
            self.on_progress(self.progress)


async def run_reader(reader: JournalReader) -> None:
    """``serve``'s reader, until stopped. A bug is never silently the end of it: it is counted
    (``internal``) and logged, and the reader runs again from where it was (its position is
    still the last one made safe: the worst is a page published twice) after a pause:
    :data:`RESTART_WAIT`, doubling to :data:`MAX_RESTART_WAIT` while it fails at the same
    position, so a bug that every re-read meets again costs little."""
    wait = RESTART_WAIT
    failed_at: str | None = _NOWHERE
    while True:
        try:
            await reader.run()
        except Exception:
            here = reader.progress.position
            wait = min(wait * 2, MAX_RESTART_WAIT) if here == failed_at else RESTART_WAIT
            failed_at = here
            metrics.JOURNAL_ERRORS.labels("internal").inc()
            log.exception(
                "journal_reader_failed",
                position=here,
                retry_in=round(wait, 2),
                action="reading again from the last safe position",
            )
        else:
            return
        if await reader.pause(wait):
            return


async def _read(answer: aiohttp.ClientResponse) -> bytes:
    """The body, or ``page_too_large`` once it passes :data:`MAX_PAGE_BYTES`."""
    if answer.content_length is not None and answer.content_length > MAX_PAGE_BYTES:
        raise JournalProblem("page_too_large", f"a page of {answer.content_length} bytes")
    chunks, size = [], 0
    async for chunk in answer.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > MAX_PAGE_BYTES:
            raise JournalProblem("page_too_large", f"a page of more than {MAX_PAGE_BYTES} bytes")
        chunks.append(chunk)
    return b"".join(chunks)
