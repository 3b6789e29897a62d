"""Event + target → the AMQP message we publish: body, properties and headers (SPEC §5).

Pure: returns an :class:`Outbound` value; ``bridge.publisher`` turns it into an aio-pika message.

Properties: ``content_type`` application/json, persistent, ``message_id`` = the Adobe event id
(consumers deduplicate on it), ``type`` = the event code, ``timestamp`` = when we received it,
``app_id`` events-bridge. Headers: ``event-code``, ``event-id``, ``registration``; ``job-id`` and
``job-status`` for job-status events; ``ims-org-id`` where the event names one; and
``adobe-provider``, ``adobe-delivery-id``, ``adobe-retry-count``, ``traceparent`` copied from the
request when present.
"""

from __future__ import annotations

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


def build_message(event: Event, target: Target, context: RequestContext) -> Outbound:
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
        message_id=event.event_id,
        type=event.event_code,
        timestamp=context.received_at,
        headers=headers,
    )
