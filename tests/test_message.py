"""Messages fit any broker: bounded properties and header values, the body never changed."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge.adobe.envelope import parse_delivery
from bridge.message import (
    MAX_HEADER_VALUE_BYTES,
    OMITTED,
    RequestContext,
    bound_headers,
    build_message,
    message_id_for,
    short_string,
)
from bridge.routing import Target


@given(st.text(max_size=400))
def test_short_strings_are_at_most_255_bytes_and_a_prefix(text: str) -> None:
    cut = short_string(text)
    assert len(cut.encode("utf-8", "surrogatepass")) <= 255
    assert text.startswith(cut)
    if len(text.encode("utf-8", "surrogatepass")) <= 255:
        assert cut == text


@pytest.mark.parametrize("event_id", ["e1", "x" * 255, "é" * 127, "é" * 128, "y" * 70_000])
def test_a_message_id_is_the_event_id_or_its_digest(event_id: str) -> None:
    message_id = message_id_for(event_id)
    if len(event_id.encode()) <= 255:
        assert message_id == event_id
    else:
        assert message_id == "sha256:" + hashlib.sha256(event_id.encode()).hexdigest()


def test_header_values_over_the_bound_are_left_out_and_named() -> None:
    small = {"a": "x", "b": "é" * 1000}  # 2,000 bytes
    assert bound_headers(small) is small
    headers = {"a": "x", "job-id": "j" * (MAX_HEADER_VALUE_BYTES + 1), "n": "€" * 2000}
    kept = bound_headers(headers)
    assert kept == {"a": "x", OMITTED: "job-id,n"}


def test_a_message_built_from_huge_fields_keeps_the_body_and_bounds_the_rest() -> None:
    raw = (
        b'{"event_id":"'
        + b"i" * 5000
        + b'","event":{"header":{"eventCode":"'
        + b"c" * 300
        + b'","imsOrgId":"'
        + b"o" * 9000
        + b'"},"body":{"jobId":"'
        + b"j" * 200_000
        + b'","status":"failed"}}}'
    )
    (event,) = parse_delivery(raw).events
    context = RequestContext("default", datetime.now(UTC), {"traceparent": "t" * 1024})
    out = build_message(event, Target("ex", "k", (("note", "n" * 10),)), context)
    assert out.body == raw
    assert out.message_id.startswith("sha256:")
    assert out.type == "c" * 255
    assert set(out.headers[OMITTED].split(",")) == {"event-id", "ims-org-id", "job-id"}
    assert out.headers["event-code"] == "c" * 300
    assert out.headers["job-status"] == "failed"
    assert out.headers["note"] == "n" * 10
    assert all(len(v.encode()) <= MAX_HEADER_VALUE_BYTES for v in out.headers.values())
