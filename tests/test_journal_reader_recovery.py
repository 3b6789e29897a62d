"""The journal reader where things are odd: a bug in it (``run_reader`` runs it again, from
its last safe position, backing off while it fails at the same place), an egress proxy (every
request through it, its password in no log line), pages that a subscriber-defined filter left
empty, and a position Adobe does not know. Against the stand-in journal of
``tests/adobe_journal.py``, no broker."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import time
from pathlib import Path

import pytest
import structlog

from bridge import journal
from bridge.adobe.journal import Page
from bridge.checkpoint import Checkpoint
from tests.adobe_journal import JournalServer
from tests.forward_proxy import ForwardProxy
from tests.journal_fixtures import Saves, Taker, errors, events, reader, run_until, statuses

pytestmark = pytest.mark.usefixtures("short_waits")  # tests/journal_fixtures.py


async def test_serves_reader_runs_again_after_a_bug_from_its_last_safe_position(
    server: JournalServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(journal, "RESTART_WAIT", 0.2)
    sent = server.add_many(events("e", 7))
    internal = errors("internal")
    take = Taker()
    made = reader(server, take, until_end=False)
    calls = 0

    async def buggy(page: Page) -> bool:
        nonlocal calls
        calls += 1
        if calls in (2, 3):  # the second page fails twice: a bug, not an unsafe page
            raise RuntimeError("a bug in the taker")
        return await take(page)

    made.take = buggy
    with structlog.testing.capture_logs() as logs:
        task = asyncio.create_task(journal.run_reader(made))
        deadline = time.monotonic() + 5.0
        while len(take.positions) < len(sent) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        made.stop()
        await asyncio.wait_for(task, 2.0)
    assert take.positions == sent  # each event once: read again from the last safe page
    assert errors("internal") == internal + 2
    failed = [entry for entry in logs if entry["event"] == "journal_reader_failed"]
    assert [(e["position"], e["retry_in"]) for e in failed] == [(sent[2], 0.2), (sent[2], 0.4)]
    assert all(entry["log_level"] == "error" for entry in failed)


async def test_a_bug_met_at_the_same_place_again_waits_longer_each_time(
    server: JournalServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(journal, "RESTART_WAIT", 0.02)
    monkeypatch.setattr(journal, "MAX_RESTART_WAIT", 0.08)
    server.add_many(events("e", 7))

    class Broken(Checkpoint):
        def save(self, position: str) -> None:  # after the page was taken: a bug each time
            raise RuntimeError("a bug in keeping the position")

    take = Taker()
    made = reader(server, take, until_end=False, checkpoint=Broken(tmp_path, server.journal_url))
    with structlog.testing.capture_logs() as logs:
        task = asyncio.create_task(journal.run_reader(made))
        deadline = time.monotonic() + 5.0
        while len(take.pages) < 7 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        made.stop()
        await asyncio.wait_for(task, 2.0)
    # The same page taken again each time (events counted each time): still the same place.
    assert {tuple(e.position for e in page.entries) for page in take.pages} == {
        tuple(e.position for e in take.pages[0].entries)
    }
    waits = [e["retry_in"] for e in logs if e["event"] == "journal_reader_failed"]
    assert waits[:6] == [0.02, 0.04, 0.08, 0.08, 0.08, 0.08]  # doubling, capped


async def test_a_next_link_that_is_not_a_url_is_a_bad_link_not_a_bug(
    server: JournalServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    sent = server.add_many(events("e", 5))
    monkeypatch.setattr(server, "_link", lambda limit, since=None: "//[bad/x")
    bad_link, internal = errors("bad_link"), errors("internal")
    take = Taker()
    await reader(server, take).run()  # until the end, on after each page's position
    assert take.positions == sent
    assert errors("bad_link") > bad_link
    assert errors("internal") == internal


async def test_serves_reader_stopped_while_pausing_after_a_bug_ends_at_once(
    server: JournalServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(journal, "RESTART_WAIT", 60.0)
    server.add_many(events("e", 2))

    async def broken(page: Page) -> bool:
        raise RuntimeError("a bug in the taker")

    internal = errors("internal")
    made = reader(server, Taker(), until_end=False)
    made.take = broken
    task = asyncio.create_task(journal.run_reader(made))
    deadline = time.monotonic() + 5.0
    while errors("internal") == internal and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert errors("internal") == internal + 1
    await asyncio.sleep(0.05)
    made.stop()
    await asyncio.wait_for(task, 1.0)  # not after the 60 s pause


async def test_a_proxy_carries_every_request_ims_included_with_its_credential(
    server: JournalServer,
) -> None:
    sent = server.add_many(events("e", 5))
    async with ForwardProxy() as proxy:
        made = reader(server, take := Taker())
        proxied = proxy.url.replace("http://", "http://egress:pr0xy@")
        made.config = dataclasses.replace(made.config, proxy=proxied)
        with structlog.testing.capture_logs() as logs:
            await made.run()
    assert take.positions == sent
    targets = [(seen.method, seen.target.split("?")[0]) for seen in proxy.seen]
    assert targets[0] == ("POST", server.token_url)  # IMS first, through the proxy too
    assert {target for method, target in targets[1:]} == {server.journal_url.split("?")[0]}
    assert len(targets) == len(server.requests) + 1  # nothing went around it
    expected = "Basic " + base64.b64encode(b"egress:pr0xy").decode()
    assert {seen.proxy_authorization for seen in proxy.seen} == {expected}
    assert "pr0xy" not in repr(made.config)
    assert "pr0xy" not in str(logs)


async def test_a_page_a_filter_left_empty_is_followed_not_taken_for_the_end(
    server: JournalServer, tmp_path: Path
) -> None:
    sent = server.add_many(events("e", 9))
    server.filtered = set(sent[3:6])  # the second page (limit 3): nothing passes the filter
    checkpoint = Saves(tmp_path, server.journal_url)
    take = Taker()
    progress = await reader(server, take, checkpoint=checkpoint).run()  # until the end
    assert take.positions == sent[:3] + sent[6:]  # on past the empty page, to the 204
    assert statuses(server) == [200, 200, 200, 204]
    assert checkpoint.saved == [sent[2], sent[5], sent[8]]  # the empty page's place kept too
    assert progress.position == sent[8]


async def test_an_empty_page_that_does_not_move_on_is_the_end(
    server: JournalServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    sent = server.add_many(events("e", 3))
    server.filtered = set(sent)
    monkeypatch.setattr(server, "_link", lambda limit, since=None: server.path)  # no since
    take = Taker()
    await reader(server, take).run()  # --until-end: it stops, and does not loop
    assert take.pages == []
    assert statuses(server) == [200]


async def test_a_position_adobe_does_not_know_names_the_file_that_keeps_it(
    server: JournalServer, tmp_path: Path
) -> None:
    server.add_many(events("e", 2))
    checkpoint = Checkpoint(tmp_path, server.journal_url)
    made = reader(server, Taker(), since="camel:not-this-journals", checkpoint=checkpoint)
    made.until_end = False
    with structlog.testing.capture_logs() as logs:
        await run_until(made, lambda: len(server.requests) >= 2)
    assert set(statuses(server)) == {400}  # retried: serve never gives up
    (detail, *_) = [e["detail"] for e in logs if e["event"] == "journal_problem"]
    assert detail == (
        f"the journal answered 400 to the position camel:not-this-journals (kept in "
        f"{checkpoint.file}): if it is not this journal's, remove the file to start again at "
        "journal.start"
    )


async def test_a_position_given_by_hand_that_adobe_does_not_know_blames_no_file(
    server: JournalServer,
) -> None:
    server.add_many(events("e", 2))
    made = reader(server, Taker(), since="camel:typo")  # journal --since, no state file
    with structlog.testing.capture_logs() as logs:
        await run_until(made, lambda: len(server.requests) >= 1)
    (detail, *_) = [e["detail"] for e in logs if e["event"] == "journal_problem"]
    assert detail == "the journal answered 400 to the position camel:typo"


async def test_a_proxy_that_refuses_connect_never_puts_its_password_in_a_log_line(
    server: JournalServer,
) -> None:
    async with ForwardProxy(connect_status=407) as proxy:
        made = reader(server, Taker(), until_end=False)
        config = made.config
        ims = dataclasses.replace(config.ims, token_url="https://127.0.0.1:9/ims/token/v3")
        proxied = proxy.url.replace("http://", "http://egress:pr0xy@")
        made.config = dataclasses.replace(config, ims=ims, proxy=proxied)
        network = errors("network")
        with structlog.testing.capture_logs() as logs:
            await run_until(made, lambda: errors("network") >= network + 2)
    assert [seen.method for seen in proxy.seen][:2] == ["CONNECT", "CONNECT"]
    details = [e["detail"] for e in logs if e["event"] == "journal_problem"]
    assert details[0] == ("IMS token request failed: the proxy answered 407 (Refused by the test)")
    assert "pr0xy" not in str(logs)
