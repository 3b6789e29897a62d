"""bridge.frames writes the same bytes as pamqp, which aiormq would have used."""

from __future__ import annotations

from datetime import UTC, datetime

import pamqp.frame
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pamqp.body import ContentBody
from pamqp.commands import Basic
from pamqp.header import ContentHeader

from bridge.frames import HeaderTooLarge, Unpublishable, content_header, fit, publish_frames
from bridge.message import OMITTED, Outbound

short = st.text(max_size=60)
# What the bridge publishes: exchange names the config allows; id, type and headers never empty
# (pamqp leaves an empty property out, and so would a message without them).
name = st.from_regex(r"[A-Za-z0-9._:-]{0,60}", fullmatch=True)
filled = st.text(min_size=1, max_size=60)


def reference(channel: int, max_body: int, out: Outbound) -> bytes:
    properties = Basic.Properties(
        content_type=out.content_type,
        delivery_mode=2,
        message_id=out.message_id,
        message_type=out.type,
        timestamp=out.timestamp,
        app_id=out.app_id,
        headers=dict(out.headers),
    )
    frames: list[Basic.Publish | ContentHeader | ContentBody] = [
        Basic.Publish(exchange=out.exchange, routing_key=out.routing_key, mandatory=True),
        ContentHeader(body_size=len(out.body), properties=properties),
    ]
    body = out.body
    frames += [ContentBody(body[i : i + max_body]) for i in range(0, len(body), max_body)]
    return b"".join(pamqp.frame.marshal(frame, channel) for frame in frames)


@given(
    channel=st.integers(1, 2047),
    max_body=st.sampled_from([4088, 131064]),
    exchange=name,
    routing_key=short,
    body=st.binary(max_size=10_000),
    message_id=filled,
    code=filled,
    headers=st.dictionaries(
        st.text(min_size=1, max_size=32), st.text(max_size=300), min_size=1, max_size=12
    ),
    seconds=st.integers(0, 2**33),
)
def test_publish_frames_are_pamqps_bytes(
    channel: int,
    max_body: int,
    exchange: str,
    routing_key: str,
    body: bytes,
    message_id: str,
    code: str,
    headers: dict[str, str],
    seconds: int,
) -> None:
    out = Outbound(
        exchange=exchange,
        routing_key=routing_key,
        body=body,
        message_id=message_id,
        type=code,
        timestamp=datetime.fromtimestamp(seconds, UTC),
        headers=headers,
    )
    assert publish_frames(channel, max_body, out) == reference(channel, max_body, out)


def test_a_large_body_is_split_like_aiormq_does() -> None:
    out = Outbound("x", "k", b"a" * 300_000, "id", "code", datetime.now(UTC), {"h": "ü" * 2000})
    frames = publish_frames(5, 131064, out)
    assert frames == reference(5, 131064, out)
    assert frames.count(b"\xce") >= 5  # method, header and three body frames


def test_no_frame_size_limit_sends_the_body_in_one_frame() -> None:
    # frame_max 0 means no limit; aiormq's max content size is then -8.
    out = Outbound("x", "k", b"a" * 300_000, "id", "code", datetime.now(UTC), {"h": "v"})
    assert publish_frames(5, -8, out) == reference(5, 300_000, out)


@given(
    max_payload=st.sampled_from([4088, 16_376, 131_064]),
    sizes=st.lists(st.integers(0, 5000), min_size=1, max_size=60),
    wide=st.booleans(),
)
def test_fit_leaves_out_the_largest_headers_until_the_header_frame_fits(
    max_payload: int, sizes: list[int], wide: bool
) -> None:
    char = "€" if wide else "a"  # 3 bytes a character, or 1
    headers = {f"h{i}": char * size for i, size in enumerate(sizes)}
    out = Outbound("x", "k", b"{}", "i" * 255, "t" * 255, datetime.now(UTC), headers)
    fitted = fit(out, max_payload)
    assert len(content_header(fitted)) <= max_payload
    publish_frames(1, max_payload, fitted)  # no HeaderTooLarge
    omitted = set(filter(None, fitted.headers.get(OMITTED, "").split(",")))
    assert omitted == set(headers) - set(fitted.headers)
    if omitted:  # the largest went first: every one kept is no larger than any left out
        kept = [len(v) for n, v in fitted.headers.items() if n != OMITTED]
        assert max(kept, default=0) <= min(len(headers[n]) for n in omitted)
    if len(content_header(out)) <= max_payload:
        assert fitted == out


def test_a_header_frame_over_the_frame_size_is_never_made() -> None:
    out = Outbound("x", "k", b"{}", "id", "t", datetime.now(UTC), {"job-id": "j" * 200_000})
    with pytest.raises(HeaderTooLarge):
        publish_frames(1, 131_064, out)
    with pytest.raises(Unpublishable):
        publish_frames(1, 131_064, Outbound("x", "k" * 256, b"", "id", "t", datetime.now(UTC), {}))
