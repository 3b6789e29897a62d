"""The journal reader (``bridge.journal.JournalReader``) against the stand-in Adobe journal of
``tests/adobe_journal.py``, with a taker that records pages (no broker): the links it follows,
the position it keeps and when, and each of Adobe's answers (ADOBE-EVENTS.md §5, SPEC §10).
What it does when things are odd (a bug, a proxy, empty pages, a position Adobe does not
know) is in ``tests/test_journal_reader_recovery.py``."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
import structlog
from aiohttp import web

from bridge import journal
from bridge.adobe.journal import Page
from bridge.checkpoint import Checkpoint
from bridge.journal import FATAL, JournalFailed
from tests.adobe_journal import JournalServer
from tests.journal_fixtures import (
    Saves,
    Taker,
    errors,
    events,
    reader,
    renewals,
    run_until,
    statuses,
)

pytestmark = pytest.mark.usefixtures("short_waits")  # tests/journal_fixtures.py


async def test_pages_follow_next_links_and_keep_the_limit(
    server: JournalServer, tmp_path: Path
) -> None:
    sent = server.add_many(events("e", 7))
    checkpoint = Saves(tmp_path, server.journal_url)
    take = Taker()
    progress = await reader(server, take, checkpoint=checkpoint).run()
    assert [len(p.entries) for p in take.pages] == [3, 3, 1]
    assert take.positions == sent
    assert [r["query"].get("limit") for r in server.requests] == ["3"] * 4
    assert [r["query"].get("since") for r in server.requests] == [None, sent[2], sent[5], sent[6]]
    assert statuses(server) == [200, 200, 200, 204]
    assert (progress.events, progress.pages, progress.position) == (7, 3, sent[-1])
    assert checkpoint.saved == [sent[2], sent[5], sent[6]]
    assert checkpoint.load() == sent[-1]


async def test_since_is_exclusive_no_event_twice(server: JournalServer) -> None:
    sent = server.add_many(events("e", 6))
    take = Taker()
    await reader(server, take, since=sent[2]).run()
    assert take.positions == sent[3:]


async def test_until_end_stops_at_the_first_204(server: JournalServer) -> None:
    take = Taker()
    progress = await reader(server, take).run()  # an empty journal: 204 at once
    assert statuses(server) == [204]
    assert (take.pages, progress.events, progress.position) == ([], 0, None)


async def test_after_latest_the_204s_next_position_is_kept(
    server: JournalServer, tmp_path: Path
) -> None:
    sent = server.add_many(events("old", 5))
    checkpoint = Checkpoint(tmp_path, server.journal_url)
    take = Taker()
    progress = await reader(server, take, start="latest", checkpoint=checkpoint).run()
    assert server.requests[0]["query"].get("latest") == "true"
    assert take.pages == []
    assert progress.position == sent[-1]
    assert checkpoint.load() == sent[-1]  # a restart resumes here, not at a later "latest"
    new = server.add_many(events("new", 2))
    again = Taker()
    await reader(server, again, since=checkpoint.load(), checkpoint=checkpoint).run()
    assert again.positions == new


async def test_a_page_not_safe_is_read_again_after_a_pause(
    server: JournalServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(journal, "MIN_BACKOFF", 0.2)
    sent = server.add_many(events("e", 2))
    checkpoint = Saves(tmp_path, server.journal_url)
    positions: list[str | None] = []
    take = Taker(False)
    made = reader(server, take, checkpoint=checkpoint)

    async def recording(page: Page) -> bool:
        positions.append(made.progress.position)
        return await take(page)

    made.take = recording
    progress = await made.run()
    assert take.positions == sent + sent  # the same page, twice
    assert take.times[1] - take.times[0] >= 0.2 * 0.8  # after a pause (jitter: ±20 %)
    assert positions == [None, None]  # the position did not move past the unsafe page
    assert checkpoint.saved == [sent[-1]]  # kept once, after the page was safe
    assert progress.events == 2


async def test_a_page_too_large_halves_the_limit(
    server: JournalServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(journal, "MAX_PAGE_BYTES", 250_000)
    sent = server.add_many(events("big", 5, pad="x" * 100_000))  # ~100 KB each
    too_large = errors("page_too_large")
    take = Taker()
    await reader(server, take, limit=4).run()
    limits = [r["query"].get("limit") for r in server.requests]
    assert limits[:2] == ["4", "2"]  # 400 KB is over the cap: half the events
    assert take.positions == sent  # each once
    assert all(len(p.entries) <= 2 for p in take.pages)
    assert errors("page_too_large") > too_large


async def test_a_401_renews_the_token_once_and_reads_on(server: JournalServer) -> None:
    sent = server.add_many(events("e", 3))
    server.fail_next(401)
    rejected, unauthorized = renewals("rejected"), errors("unauthorized")
    take = Taker()
    await reader(server, take, fatal=FATAL).run()
    assert take.positions == sent
    assert server.token_requests == 2
    assert renewals("rejected") == rejected + 1
    assert errors("unauthorized") == unauthorized + 1
    assert server.requests[0]["token"] != server.requests[1]["token"]


async def test_two_401s_in_a_row_end_a_one_shot_reader(server: JournalServer) -> None:
    server.add_many(events("e", 3))
    server.fail_next(401, times=2)
    take = Taker()
    with pytest.raises(JournalFailed, match="refused a fresh token"):
        await reader(server, take, fatal=FATAL).run()
    assert take.pages == []
    assert server.token_requests == 2


async def test_a_403_ends_a_one_shot_reader(server: JournalServer) -> None:
    server.add_many(events("e", 3))
    server.fail_next(403)
    with pytest.raises(JournalFailed, match="403"):
        await reader(server, Taker(), fatal=FATAL).run()


async def test_a_403_is_retried_by_serves_reader(server: JournalServer) -> None:
    sent = server.add_many(events("e", 3))
    server.fail_next(403, times=2)
    rejected = errors("rejected")
    take = Taker()
    await reader(server, take, fatal=()).run()
    assert statuses(server)[:2] == [403, 403]
    assert take.positions == sent
    assert errors("rejected") == rejected + 2


async def test_an_expired_position_reads_from_the_oldest_with_a_warning(
    server: JournalServer,
) -> None:
    sent = server.add_many(events("e", 8))
    server.expire(5)
    take = Taker()
    with structlog.testing.capture_logs() as logs:
        await reader(server, take, since=sent[1], fatal=FATAL).run()
    assert statuses(server)[0] == 410
    assert server.requests[1]["query"].get("since") is None  # the oldest kept
    assert take.positions == sent[5:]
    (warning,) = [e for e in logs if e["event"] == "journal_position_expired"]
    assert warning["log_level"] == "warning"
    assert warning["position"] == sent[1]


async def test_429_waits_as_long_as_retry_after_says(server: JournalServer) -> None:
    sent = server.add_many(events("e", 2))
    server.fail_next(429, retry_after=0.5)
    throttled = errors("throttled")
    take = Taker()
    started = time.monotonic()
    await reader(server, take, fatal=FATAL).run()
    elapsed = time.monotonic() - started
    assert 0.5 <= elapsed < 2.0
    assert take.positions == sent
    assert errors("throttled") == throttled + 1


async def test_5xx_backs_off_doubling(server: JournalServer) -> None:
    sent = server.add_many(events("e", 2))
    server.fail_next(500, times=3)
    take = Taker()
    started = time.monotonic()
    await reader(server, take, fatal=FATAL).run()
    # 0.02 + 0.04 + 0.08 s (±20 %): doubling, not the same pause three times.
    assert time.monotonic() - started >= 0.14 * 0.8
    assert statuses(server) == [500, 500, 500, 200, 204]
    assert take.positions == sent


async def test_stop_ends_a_waiting_reader_at_once() -> None:
    with JournalServer(retry_after=30) as slow:
        made = reader(slow, Taker(), until_end=False)
        task = asyncio.create_task(made.run())
        while not slow.requests:  # the 204: now it waits 30 s
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)
        started = time.monotonic()
        made.stop()
        await asyncio.wait_for(task, 1.0)
        assert time.monotonic() - started < 0.3
        assert statuses(slow) == [204]


@pytest.fixture
def links_elsewhere(server: JournalServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """The journal's next links point to another host."""
    monkeypatch.setattr(
        server, "_link", lambda limit, since=None: f"https://elsewhere.example/next?since={since}"
    )


@pytest.mark.usefixtures("links_elsewhere")
async def test_a_next_link_to_another_host_is_not_followed(server: JournalServer) -> None:
    sent = server.add_many(events("e", 4))
    take = Taker()
    with pytest.raises(JournalFailed, match=r"another host \(elsewhere\.example\)"):
        await reader(server, take, fatal=FATAL).run()
    assert take.positions == sent[:3]  # the page was taken; its link is refused
    assert len(server.requests) == 1


@pytest.mark.usefixtures("links_elsewhere")
async def test_serves_reader_reads_on_past_a_link_to_another_host(server: JournalServer) -> None:
    sent = server.add_many(events("e", 7))
    take = Taker()
    before = errors("bad_link")
    progress = await reader(server, take).run()  # until the end; no link followed
    assert take.positions == sent  # every event once: on after the last position instead
    assert progress.position == sent[-1]
    assert errors("bad_link") == before + 3
    assert all("elsewhere" not in r["path"] for r in server.requests)


async def test_a_following_reader_polls_the_end_no_faster_than_retry_after(
    server: JournalServer,
) -> None:
    server.add_many(events("e", 2))
    take = Taker()
    await run_until(reader(server, take, until_end=False), lambda: False, seconds=0.5)
    # The page, then a 204 every 0.1 s (retry-after): about 5 requests in 0.5 s, not hundreds.
    assert 3 <= len(server.requests) <= 8, statuses(server)


async def test_a_retry_after_of_zero_is_no_license_to_hammer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(journal, "MIN_WAIT", 0.1)
    with JournalServer(retry_after=0) as eager:
        take = Taker()
        await run_until(reader(eager, take, until_end=False), lambda: False, seconds=0.5)
        assert len(eager.requests) <= 10, f"{len(eager.requests)} requests in 0.5 s"


async def test_a_malformed_page_is_retried_not_taken(
    server: JournalServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    sent = server.add_many(events("e", 2))
    real = server._page  # noqa: SLF001
    calls: list[int] = []

    def broken(start: int, limit: int | None) -> Any:
        response, count = real(start, limit)
        if not calls:
            response.body = b'{"events": [{"position": 5}]}'
        calls.append(start)
        return response, count

    monkeypatch.setattr(server, "_page", broken)
    bad_page = errors("bad_page")
    take = Taker()
    await reader(server, take, fatal=FATAL).run()
    assert take.positions == sent
    assert errors("bad_page") == bad_page + 1


async def test_a_410_to_the_oldest_is_no_license_to_hammer(
    server: JournalServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only a position expires: a 410 to a request without one is backed off, not looped."""
    monkeypatch.setattr(journal, "MIN_BACKOFF", 0.1)
    monkeypatch.setattr(journal, "MIN_WAIT", 0.1)
    sent = server.add_many(events("e", 3))
    server.fail_next(410, times=1000)
    await run_until(reader(server, Taker(), since=sent[0], until_end=False), lambda: False, 0.5)
    assert len(server.requests) <= 10, f"{len(server.requests)} requests in 0.5 s"


async def test_a_429_with_retry_after_zero_is_no_license_to_hammer(
    server: JournalServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(journal, "MIN_WAIT", 0.1)
    server.fail_next(429, times=1000, retry_after=0)
    await run_until(reader(server, Taker(), until_end=False), lambda: False, 0.5)
    assert len(server.requests) <= 10, f"{len(server.requests)} requests in 0.5 s"


async def test_stop_ends_a_reader_waiting_for_an_answer_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Ctrl-C while Adobe is slow to answer: no page is in hand, so nothing to finish."""
    slow = JournalServer(retry_after=0.1)
    asked = asyncio.Event()
    loop = asyncio.get_running_loop()

    async def hangs(request: web.Request) -> web.Response:
        loop.call_soon_threadsafe(asked.set)
        await asyncio.sleep(10)
        return web.Response(status=204)

    monkeypatch.setattr(slow, "_journal", hangs)
    with slow:
        slow.add_many(events("e", 2))
        made = reader(slow, Taker(), until_end=False)
        task = asyncio.create_task(made.run())
        await asyncio.wait_for(asked.wait(), 2.0)
        started = time.monotonic()
        made.stop()
        progress = await asyncio.wait_for(task, 4.0)
        assert time.monotonic() - started < 0.5
        assert (progress.events, progress.position) == (0, None)
