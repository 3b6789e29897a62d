"""Start offsets for reading a stream, checked before the broker sees them, and the reader's
position that a reconnect resumes from."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from bridge.streams import (
    OFFSET_ARGUMENT,
    StreamPosition,
    message_offset,
    offset_argument,
    parse_offset,
)


@pytest.mark.parametrize("offset", ["first", "last", "next", 0, 42, 2**40])
def test_words_and_offsets_go_to_the_broker_as_they_are(offset: str | int) -> None:
    assert offset_argument(offset) == offset


def test_longer_ago_than_1970_is_1970() -> None:
    # An AMQP timestamp counts seconds since 1970, unsigned: "from the beginning of time".
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    assert offset_argument("99999999999Y") == epoch
    assert offset_argument(timedelta(days=999_999_999)) == epoch
    assert offset_argument(datetime(1900, 1, 1, tzinfo=UTC)) == epoch


def test_a_point_in_time_needs_its_time_zone() -> None:
    moment = datetime(2025, 1, 31, 8, 0, tzinfo=timezone(timedelta(hours=1)))
    assert offset_argument(moment) == moment
    with pytest.raises(ValueError, match="with its time zone"):
        offset_argument(datetime(2025, 1, 31, 8, 0))  # no time zone


@pytest.mark.parametrize(
    ("age", "seconds"),
    [
        (timedelta(minutes=5), 300),
        ("45s", 45),
        ("30m", 1800),
        ("12h", 12 * 3600),
        ("7D", 7 * 86400),
        ("1M", 30 * 86400),
        ("1Y", 365 * 86400),
    ],
)
def test_how_long_ago_becomes_a_point_in_time_fixed_now(age: str | timedelta, seconds: int) -> None:
    before = datetime.now(UTC)
    moment = offset_argument(age)
    assert isinstance(moment, datetime)
    assert (
        before - timedelta(seconds=seconds + 1)
        <= moment
        <= datetime.now(UTC) - timedelta(seconds=seconds)
    )


@pytest.mark.parametrize(
    "offset",
    [
        *("", "beginning", "FIRST", "7d", "0D", "1.5h", "-1", "1"),
        *(-1, 2**63, True, 1.5, None, timedelta(seconds=-1)),
    ],
)
def test_anything_else_is_refused_before_the_broker_sees_it(offset: object) -> None:
    # RabbitMQ closes the whole connection (INTERNAL_ERROR) on an offset string it cannot read.
    with pytest.raises(ValueError, match=r"^expected first, last, next, an offset"):
        offset_argument(offset)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "offset"),
    [
        ("first", "first"),
        (" next ", "next"),
        ("last", "last"),
        ("1234", 1234),
        ("12h", "12h"),
        ("2025-01-31T08:00:00Z", datetime(2025, 1, 31, 8, 0, tzinfo=UTC)),
        ("2025-01-31T09:00:00+01:00", datetime(2025, 1, 31, 8, 0, tzinfo=UTC)),
    ],
)
def test_offsets_from_text(text: str, offset: object) -> None:
    assert parse_offset(text) == offset


@pytest.mark.parametrize("text", ["", "soon", "2025-01-31T08:00:00", "2025-01-31", "-5", "٣"])
def test_text_that_is_no_offset_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match=r"^expected first, last, next"):
        parse_offset(text)


def test_the_offset_header_of_a_stream_message() -> None:
    assert message_offset({OFFSET_ARGUMENT: 7}) == 7
    assert message_offset({OFFSET_ARGUMENT: True}) is None
    assert message_offset({}) is None
    assert message_offset(None) is None


def test_the_position_resumes_at_the_first_message_not_handled() -> None:
    position = StreamPosition("first")
    assert position.resume_at == "first"  # nothing read yet: a reconnect starts over
    assert position.take(10)
    assert position.take(11)
    assert position.take(12)
    assert position.resume_at == 10
    position.done(11)
    assert position.resume_at == 10  # 10 is still in the handler
    position.done(10)
    assert position.resume_at == 12
    position.done(12)
    assert position.resume_at == 13
    assert position.arguments == {OFFSET_ARGUMENT: 13}  # what the consumer's restore sends


def test_after_a_reconnect_what_was_handled_is_passed_over_and_the_rest_is_read() -> None:
    position = StreamPosition(0)
    for offset in (0, 1, 2, 3):
        assert position.take(offset)
    position.done(0)
    position.done(2)  # 1 and 3 were cut short by the reconnect: never done
    assert position.resume_at == 1
    # The broker delivers again from 1 (or, should the consumer start over, from 0).
    assert not position.take(0)
    assert position.take(1)
    assert not position.take(2)
    assert position.take(3)
    assert position.take(4)
    for offset in (1, 3, 4):
        position.done(offset)
    assert position.resume_at == 5
    assert position.passed_over == 2


def test_a_message_without_an_offset_is_handled_and_not_tracked() -> None:
    position = StreamPosition("next")
    assert position.take(None)
    position.done(None)
    assert position.resume_at == "next"
