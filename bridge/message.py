"""Event + target → the AMQP message we publish: body, properties and headers (the
README, "What is published").

Pure: returns an :class:`Outbound` value; ``bridge.publisher`` turns it into an aio-pika message.

Properties: ``content_type`` application/json, persistent, ``message_id`` = the Adobe event id
(consumers deduplicate on it), ``type`` = the event code, ``timestamp`` = when we received it,
``app_id`` events-bridge. Headers: ``event-code``, ``event-id``, ``registration``; ``job-id`` and
``job-status`` for job-status events; ``ims-org-id`` where the event names one; and
``adobe-provider``, ``adobe-delivery-id``, ``adobe-retry-count``, ``traceparent`` copied from the
request when present.

Bounds, so that every message fits any broker (AMQP short strings are at most 255 bytes; a
content header must fit one frame, at least 4 KiB) and the body is never changed:

- ``message_id`` is the event id, or ``sha256:<hex>`` of it when the id is over 255 bytes (stable
  across Adobe's retries, so consumers still deduplicate on it); the ``event-id`` header keeps the
  id itself;
- ``type`` is the event code cut to 255 bytes (the ``event-code`` header keeps it whole);
- a header value over :data:`MAX_HEADER_VALUE_BYTES` is left out, and the header
  ``bridge-omitted`` names every header left out (``bridge.frames`` leaves out more, largest
  first, should the whole still not fit the connection's frame size).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime

from bridge.adobe.envelope import Event
from bridge.routing import Target

APP_ID = "events-bridge"
CONTENT_TYPE = "application/json"

# request header → message header, copied when present
COPIED_HEADERS = {
    "x-adobe-provider": "adobe-provider",
    "x-adobe-delivery-id": "adobe-delivery-id",
    "x-adobe-retry-count": "adobe-retry-count",
    "traceparent": "traceparent",
}
MAX_COPIED_HEADER = 1024
MAX_SHORT_STRING = 255  # AMQP short strings: message_id, type
MAX_HEADER_VALUE_BYTES = 4096
OMITTED = "bridge-omitted"  # the header naming the headers left out for their size


def header_text(
    headers: Mapping[str, str], name: str, limit: int = MAX_COPIED_HEADER
) -> str | None:
    """A request header's value if present and valid UTF-8 (aiohttp keeps other bytes as lone
    surrogates, which no AMQP header or JSON log line can carry), cut to ``limit`` characters."""
    value = headers.get(name)
    if not value:
        return None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return None
    return value[:limit]


@dataclass(frozen=True)
class RequestContext:
    """What a delivery's HTTP request tells about all of its events."""

    registration: str
    received_at: datetime
    copied: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_headers(
        cls, registration: str, received_at: datetime, headers: Mapping[str, str]
    ) -> RequestContext:
        copied = {
            name: value
            for source, name in COPIED_HEADERS.items()
            if (value := header_text(headers, source)) is not None
        }
        return cls(registration, received_at, copied)


@dataclass(frozen=True)
class Outbound:
    exchange: str
    routing_key: str
    body: bytes
    message_id: str
    type: str
    timestamp: datetime
    headers: dict[str, str]
    content_type: str = CONTENT_TYPE
    app_id: str = APP_ID
    # The first message of its event (an event with several targets gives several messages):
    # the one that counts the event in the metrics of published events.
    primary: bool = True


def fits_short_string(text: str) -> bool:
    """Whether ``text`` is at most 255 bytes of UTF-8 (a character takes 1 to 4 bytes, so most
    texts need no encoding to tell)."""
    return len(text) * 4 <= MAX_SHORT_STRING or len(text.encode("utf-8")) <= MAX_SHORT_STRING


def short_string(text: str) -> str:
    """``text`` cut to at most 255 bytes of UTF-8, on a character boundary."""
    if fits_short_string(text):
        return text
    return text.encode("utf-8")[:MAX_SHORT_STRING].decode("utf-8", "ignore")


def message_id_for(event_id: str) -> str:
    """The event id, or a digest of it when it is too long for the ``message_id`` property."""
    if fits_short_string(event_id):
        return event_id
    return "sha256:" + hashlib.sha256(event_id.encode("utf-8", "surrogatepass")).hexdigest()


def bound_headers(headers: dict[str, str]) -> dict[str, str]:
    """``headers`` without the values over :data:`MAX_HEADER_VALUE_BYTES`, which ``OMITTED``
    names; the same dict when nothing is left out (the common case costs a length check)."""
    limit = MAX_HEADER_VALUE_BYTES
    large = [n for n, v in headers.items() if len(v) * 4 > limit and len(v.encode()) > limit]
    if not large:
        return headers
    kept = {n: v for n, v in headers.items() if n not in large}
    kept[OMITTED] = ",".join(sorted(large))
    return kept


def build_message(
    event: Event, target: Target, context: RequestContext, primary: bool = True
) -> Outbound:
    headers = {
        "event-code": event.event_code,
        "event-id": event.event_id,
        "registration": context.registration,
    }
    if event.job_id is not None:
        headers["job-id"] = event.job_id
    if event.job_status is not None:
        headers["job-status"] = event.job_status
    if event.ims_org is not None:
        headers["ims-org-id"] = event.ims_org
    headers.update(context.copied)
    headers.update(target.headers)  # a rule's extra headers
    return Outbound(
        exchange=target.exchange,
        routing_key=target.routing_key,
        body=event.body,
        message_id=message_id_for(event.event_id),
        type=short_string(event.event_code),
        timestamp=context.received_at,
        headers=bound_headers(headers),
        primary=primary,
    )
