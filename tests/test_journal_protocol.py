"""Adobe's Journaling API as ``bridge.adobe.journal`` reads it: start points, links, waits, pages
(ADOBE-EVENTS.md §5)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import orjson
import pytest

from bridge.adobe.journal import (
    MAX_WAIT,
    JournalProblem,
    event_time,
    links,
    parse_page,
    query_value,
    resolve,
    retry_after,
    seek_duration,
    start_query,
    with_query,
)

BASE = "https://events-va6.adobe.io/events/organizations/23294/integrations/54108/f89067f2"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("-PT2H", timedelta(hours=2)),
        ("-P1D", timedelta(days=1)),
        ("-P1DT30M", timedelta(days=1, minutes=30)),
        ("-PT90S", timedelta(seconds=90)),
        ("-P7D", timedelta(days=7)),
        (" -PT5M ", timedelta(minutes=5)),
    ],
)
def test_seek_takes_negative_durations_within_the_retention(text: str, expected: timedelta) -> None:
    assert seek_duration(text) == expected


@pytest.mark.parametrize(
    "text", ["PT2H", "-P8D", "-PT", "-P", "-PT0S", "-P1W", "2h", "-PT2H;", "", "-P1Y", "-PT-1H"]
)
def test_seek_refuses_anything_else(text: str) -> None:
    assert seek_duration(text) is None


def test_start_points_become_adobes_query() -> None:
    assert start_query("oldest") == {}
    assert start_query("latest") == {"latest": "true"}
    assert start_query("-PT2H") == {"seek": "-PT2H"}
    with pytest.raises(ValueError, match="not a start point"):
        start_query("yesterday")


def test_with_query_sets_removes_and_keeps_parameters() -> None:
    url = with_query(BASE + "?limit=5&latest=true", since="camel:1:2", latest=None)
    assert query_value(url, "since") == "camel:1:2"
    assert query_value(url, "limit") == "5"
    assert query_value(url, "latest") is None
    assert with_query(url, limit=7).count("limit=") == 1


def test_link_header_by_relation_as_adobe_sends_it() -> None:
    path = "/events/organizations/23294/integrations/54108/f89067f2"
    header = (
        f'<{path}?since=moose:1&limit=2>; rel="next", '
        f'<{path}/validate?since=moose:1>; rel="validate"'
    )
    found = links(header)
    assert found["next"].endswith("?since=moose:1&limit=2")
    assert "/validate?" in found["validate"]
    assert links(None) == {}
    assert links("garbage, <x>; foo=bar") == {}
    assert links("<a>; rel=next") == {"next": "a"}


def test_relative_links_resolve_against_the_journal_origin() -> None:
    url = resolve(BASE + "?limit=2", "/events/organizations/23294/integrations/54108/f8?since=a")
    assert (
        url
        == "https://events-va6.adobe.io/events/organizations/23294/integrations/54108/f8?since=a"
    )


@pytest.mark.parametrize(
    "link",
    [
        "https://elsewhere.example/steal?since=a",
        "//elsewhere.example/x",
        "http://events-va6.adobe.io/x",
    ],
)
def test_a_link_to_another_origin_is_never_followed(link: str) -> None:
    with pytest.raises(JournalProblem) as caught:
        resolve(BASE, link)
    assert caught.value.kind == "bad_link"


def test_retry_after_in_seconds_or_as_a_date_bounded() -> None:
    now = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)
    assert retry_after("10", 3.0, now) == 10.0
    assert retry_after(None, 3.0, now) == 3.0
    assert retry_after("soon", 3.0, now) == 3.0
    assert retry_after("Wed, 02 Dec 2026 12:00:30 GMT", 3.0, now) == 30.0
    assert retry_after("Wed, 02 Dec 2026 11:00:00 GMT", 3.0, now) == 0.0
    assert retry_after("999999", 3.0, now) == MAX_WAIT


def page(*entries: object, last: str | None = None) -> bytes:
    doc: dict[str, object] = {"events": list(entries)}
    if last is not None:
        doc["_page"] = {"last": last, "count": len(entries)}
    return orjson.dumps(doc)


def test_a_page_gives_positions_compact_bodies_and_times() -> None:
    event = {"specversion": "1.0", "id": "e1", "type": "t", "time": "2026-12-02T10:00:00Z"}
    parsed = parse_page(page({"position": "p1", "event": event}, last="p1"))
    assert parsed.last == "p1"
    (entry,) = parsed.entries
    assert (entry.position, orjson.loads(entry.body)) == ("p1", event)
    assert entry.time == datetime(2026, 12, 2, 10, tzinfo=UTC)


def test_without_page_metadata_the_last_entry_is_the_position() -> None:
    parsed = parse_page(page({"position": "a", "event": {}}, {"position": "b", "event": {}}))
    assert parsed.last == "b"
    assert parse_page(page()).last is None


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[]",
        b'{"events": {}}',
        page("x"),
        page({"event": {}}),
        page({"position": "", "event": {}}),
        page({"position": "p", "event": "text"}),
        page({"position": "p" * 2000, "event": {}}),
    ],
)
def test_a_malformed_page_is_a_bad_page(body: bytes) -> None:
    with pytest.raises(JournalProblem) as caught:
        parse_page(body)
    assert caught.value.kind == "bad_page"


@pytest.mark.parametrize(
    ("event", "expected"),
    [
        ({"time": "2026-12-02T10:00:00.123Z"}, datetime(2026, 12, 2, 10, 0, 0, 123000, UTC)),
        (
            {"event": {"activitystreams:published": "2026-12-02T10:00:00+01:00"}},
            datetime(2026, 12, 2, 9, tzinfo=UTC),
        ),
        ({"time": "2026-12-02T10:00:00"}, None),  # no zone: not a time to compare
        ({"time": 5}, None),
        ({}, None),
    ],
)
def test_event_time(event: dict[str, object], expected: datetime | None) -> None:
    assert event_time(event) == expected
