"""One :class:`~bridge.message.Outbound` → the AMQP 0-9-1 frames of its ``basic.publish``, as bytes.

Part of the deliver step. pamqp, which aiormq uses, marshals each frame through generic,
table-driven code; that cost a third of a publish (profiled with ``make bench``). The frames of a
publish with our fixed set of properties are simple enough to write directly: a method frame
(``basic.publish``: exchange, routing key, mandatory), a content header (body size, property
flags, the properties in flag order) and the body in frames of at most ``frame_max - 8`` bytes.
``tests/test_frames.py`` checks these bytes against pamqp's for many messages.

A content header must fit one frame: the broker closes the whole connection otherwise
(``FRAME_ERROR``, frame_too_large), failing every publish on it. :func:`publish_frames` refuses to
make such a frame (:class:`HeaderTooLarge`), and :func:`fit` leaves headers out, largest first,
naming them in ``bridge-omitted``, until the header fits the connection's frame size.

Pure: no I/O. Header values are strings (AMQP long strings, type ``S``), as message.py makes them.
"""

from __future__ import annotations

import dataclasses
import struct
from datetime import datetime

from bridge.message import OMITTED, Outbound

FRAME_END = b"\xce"
_METHOD = struct.Struct(">BHI")  # frame type, channel, payload size
_PUBLISH = struct.Struct(">HHH")  # class 60 (basic), method 40 (publish), reserved ticket 0
_HEADER_START = struct.Struct(">HHQH")  # class 60, weight 0, body size, property flags
_LONG = struct.Struct(">I")

# Property flags, in the order their values follow the flags (AMQP 0-9-1, basic class).
_CONTENT_TYPE = 1 << 15
_HEADERS = 1 << 13
_DELIVERY_MODE = 1 << 12
_MESSAGE_ID = 1 << 7
_TIMESTAMP = 1 << 6
_TYPE = 1 << 5
_APP_ID = 1 << 3
_PERSISTENT = b"\x02"


class Unpublishable(ValueError):
    """No frame can carry this message as it is; publishing it again would fail again."""


class HeaderTooLarge(Unpublishable):
    """The content header is larger than one frame (:func:`fit` makes it fit)."""


def _shortstr(text: str) -> bytes:
    data = text.encode()
    if len(data) > 255:
        raise Unpublishable(f"AMQP short string over 255 bytes: {text[:40]!r}…")
    return bytes((len(data),)) + data


def _field_name(name: str) -> bytes:
    """A header table entry's name and its type (long string), as they precede the value."""
    key = name.encode()
    if len(key) > 128:  # AMQP field names; the config refuses longer ones
        raise Unpublishable(f"AMQP header name over 128 bytes: {name[:40]!r}…")
    return bytes((len(key),)) + key + b"S"


# Header names are few (ours, the copied request headers' and the rules' own; none comes from a
# request body or a request header's name): each is encoded once. The cap is only a backstop.
_FIELD_NAMES: dict[str, bytes] = {}
_MAX_FIELD_NAMES = 1024


def _table(values: dict[str, str]) -> bytes:
    parts: list[bytes] = []
    names = _FIELD_NAMES
    for name in sorted(values):  # sorted, as pamqp does
        prefix = names.get(name)
        if prefix is None:
            prefix = _field_name(name)
            if len(names) < _MAX_FIELD_NAMES:
                names[name] = prefix
        data = values[name].encode()
        parts += (prefix, _LONG.pack(len(data)), data)
    body = b"".join(parts)
    return _LONG.pack(len(body)) + body


def _timestamp(moment: datetime) -> bytes:
    return int(moment.timestamp()).to_bytes(8, "big")


def content_header(out: Outbound) -> bytes:
    """The payload of ``out``'s content header frame: body size, property flags, properties."""
    properties = (
        _shortstr(out.content_type)
        + _table(out.headers)
        + _PERSISTENT
        + _shortstr(out.message_id)
        + _timestamp(out.timestamp)
        + _shortstr(out.type)
        + _shortstr(out.app_id)
    )
    flags = _CONTENT_TYPE | _HEADERS | _DELIVERY_MODE | _MESSAGE_ID | _TIMESTAMP | _TYPE | _APP_ID
    return _HEADER_START.pack(60, 0, len(out.body), flags) + properties


def fit(out: Outbound, max_payload: int) -> Outbound:
    """``out`` with headers left out, largest first, until its content header takes at most
    ``max_payload`` bytes (``frame_max - 8``); ``bridge-omitted`` names those left out.

    What cannot be left out (the properties: at most 5 short strings) always fits the smallest
    frame AMQP allows (4 KiB).
    """
    while max_payload > 0 and len(content_header(out)) > max_payload:
        headers = dict(out.headers)
        named = headers.pop(OMITTED, "")
        if not headers:
            raise HeaderTooLarge(f"properties alone exceed a frame of {max_payload} bytes")
        largest = max(headers, key=lambda n: len(headers[n].encode()) + len(n))
        del headers[largest]
        headers[OMITTED] = ",".join(sorted({*filter(None, named.split(",")), largest}))
        out = dataclasses.replace(out, headers=headers)
    return out


def publish_frames(channel: int, max_body: int, out: Outbound) -> bytes:
    """The frames of ``basic.publish`` of ``out`` on ``channel``, mandatory, persistent; the body
    in frames of at most ``max_body`` bytes (the connection's ``frame_max`` less 8).

    Raises :class:`HeaderTooLarge` when the content header would not fit one frame (:func:`fit`
    first), and :class:`Unpublishable` when a short string is over 255 bytes."""
    method = (
        _PUBLISH.pack(60, 40, 0) + _shortstr(out.exchange) + _shortstr(out.routing_key) + b"\x01"
    )
    header = content_header(out)
    if 0 < max_body < len(header):
        raise HeaderTooLarge(f"content header of {len(header)} bytes, frames of {max_body}")
    parts = [
        _METHOD.pack(1, channel, len(method)),
        method,
        FRAME_END,
        _METHOD.pack(2, channel, len(header)),
        header,
        FRAME_END,
    ]
    body = out.body
    if max_body <= 0:  # frame_max 0: no limit, the body goes in one frame
        max_body = max(len(body), 1)
    for start in range(0, len(body), max_body):
        chunk = body[start : start + max_body]
        parts += [_METHOD.pack(3, channel, len(chunk)), chunk, FRAME_END]
    return b"".join(parts)
