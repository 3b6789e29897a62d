"""Raw (already verified) body bytes → the events inside it.

Adobe delivers one event per request, or a JSON array of events (batch delivery, up to 20 events
and 2 MB), each in one of two envelopes:

- ``adobe_io`` (legacy): ``{"event_id": ..., "event": {"header": {...}, "body": {...}}}``;
- CloudEvents 1.0: ``{"specversion": "1.0", "type": ..., "eventid": ..., "data": {...}}``.

A body of only ``{"validationUrl": ...}`` is Adobe's asynchronous URL validation, not an event.
Any other JSON object is taken as a bare event when its id and code can be found.

Owns: the event id (``eventid``, else ``event_id``, else the ``x-adobe-event-id`` header on a
single delivery; never the CloudEvents ``id``; failing all three, ``sha256:`` + the hex digest of
the event's bytes), the event code (CloudEvents ``type``, else ``event.header.eventCode`` or
``event.header._adobeio.eventCode``, else the type of a CloudEvent wrapped in ``event.body``, else
the ``x-adobe-event-code`` header on a single delivery, else ``unknown``), the recipient (the
README, "Verification": the top-level ``recipientclientid``, else the top-level
``recipient_client_id``, the two agreeing when both are there; inside ``event`` only in Marketo's
wrapped form, whose ``event.body`` is itself a CloudEvent, and only when the top has none), the IMS
org (``_ORG_PATHS``, per provider: Adobe's envelope before the provider's payload; Commerce, AEM as
a Cloud Service, InDesign, Asset and custom events name none in the body), and the job id and
aggregate status (``bridge.adobe.jobstatus``). Each event keeps its own bytes: the whole body for a
single delivery, and for a batch the element's bytes cut from the array unchanged, so nothing is
re-encoded and numbers, escapes and key order stay exactly as Adobe signed them.

Does not: check signatures or recipients (the receiver does), or touch the network.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from bridge.adobe.batch import batch_elements, check_count, decode_json, split_array
from bridge.adobe.jobstatus import job_id, job_status
from bridge.errors import BadRequest, PayloadTooLarge

# The x-adobe-event-id/-code headers are read up to this many characters: ids and codes are
# short, and a longer one is bounded when the message is built (bridge.message).
MAX_HEADER_FIELD = 1024
UNKNOWN_CODE = "unknown"
# Adobe batches hold at most 20 events (2 MB); a batch of more than the configured bound is
# refused before any work per element (server.max_batch_events).
DEFAULT_MAX_EVENTS = 1000


@dataclass(frozen=True)
class Event:
    body: bytes  # published as is
    document: dict[str, Any]
    envelope: str  # "cloudevents", "adobe_io" or "bare"
    event_id: str
    event_code: str
    recipient: str | None  # the client id this event is addressed to (None: not known)
    recipient_problem: str | None  # why the recipient is not known, when it is not
    ims_org: str | None
    job_id: str | None
    job_status: str | None


@dataclass(frozen=True)
class Delivery:
    events: tuple[Event, ...]
    batch: bool
    validation_url: str | None = None


def _get(doc: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(doc, dict):
            return None
        doc = doc.get(key)
    return doc


def _text(doc: Any, *path: str) -> str | None:
    value = _get(doc, *path)
    if isinstance(value, str) and value.strip() and _encodable(value):
        return value
    return None


def _encodable(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: valid JSON, but no header can carry it
        return False
    return True


def _first(doc: dict[str, Any], paths: tuple[tuple[str, ...], ...]) -> str | None:
    for path in paths:
        value = _text(doc, *path)
        if value is not None:
            return value
    return None


_ID_PATHS = (("eventid",), ("event_id",))
_CODE_PATHS = (
    ("event", "header", "eventCode"),
    ("event", "header", "_adobeio", "eventCode"),
)
# The IMS org, first found wins: the fields of Adobe's envelope, then those inside a provider's
# payload (which a custom provider's publisher writes at will), so a payload never overrides what
# the envelope says. Never a request header: AEM names the org only in x-adobe-provider, and no
# header is signed. Sources: tests/data/adobe-samples/events/INDEX.md, tests/data/adobe-2026/.
_ORG_PATHS = (
    # Imaging API (Photoshop, Lightroom job status): the adobe_io envelope's header
    ("event", "header", "imsOrgId"),
    ("event", "header", "_adobeio", "imsOrgId"),
    # Express API: the CloudEvents extension Adobe documents as "containing IMS organization
    # information" (Express API guide, "Handle Webhook Events")
    ("adobeinternal", "imsOrg"),
    # a top-level field (no published sample has one; kept for bare events)
    ("imsorgid",),
    ("imsOrgId",),
    # -- inside the provider's payload --
    # Marketo notification and user-audit streams, plain and wrapped in adobe_io
    ("data", "imsOrgId"),
    ("event", "body", "data", "imsOrgId"),
    # Analytics Triggers: the pipeline message's own header
    ("event", "com.adobe.mcloud.pipeline.pipelineMessage", "header", "imsOrg"),
    # AEM add-on module (XDM event model): the addressee, in adobe_io, in a CloudEvent, or bare
    ("event", "activitystreams:to", "xdmImsOrg:id"),
    ("data", "activitystreams:to", "xdmImsOrg:id"),
    ("activitystreams:to", "xdmImsOrg:id"),
    # Admin Console audit logs (OCSF): the cloud's org
    ("data", "cloud", "org", "uid"),
)
_RECIPIENT_FIELDS = ("recipientclientid", "recipient_client_id")


def _envelope(doc: dict[str, Any]) -> str:
    if "specversion" in doc:
        return "cloudevents"
    if "event" in doc:
        return "adobe_io"
    return "bare"


def _code(doc: dict[str, Any], envelope: str) -> str | None:
    if envelope == "cloudevents":
        return _text(doc, "type")
    code = _first(doc, _CODE_PATHS)
    if code is None and _get(doc, "event", "body", "specversion") is not None:
        code = _text(doc, "event", "body", "type")  # a CloudEvent wrapped in adobe_io (Marketo)
    return code


def _recipient(doc: dict[str, Any]) -> tuple[str | None, str | None]:
    """(the recipient, or None and why not), as the README's "Verification" says.

    Adobe signs every customer's deliveries with the same keys, so what binds a signed body to
    us is its own top-level recipient. Fields inside the provider's payload never vouch for it:
    a provider chooses them. The one exception is Marketo's wrapped form, where ``event`` wraps
    a CloudEvent in ``event.body`` and carries the recipient beside it, with none at the top.
    """
    found = _recipient_in(doc, "")
    if found is not None:
        return found
    inner = doc.get("event")
    if isinstance(inner, dict) and _get(inner, "body", "specversion") is not None:
        found = _recipient_in(inner, "event.")
        if found is not None:
            return found
    return None, "no recipient client id (recipientclientid)"


def _recipient_in(scope: dict[str, Any], where: str) -> tuple[str | None, str | None] | None:
    """The recipient named in ``scope``, or None when ``scope`` names none at all."""
    present = [(name, scope[name]) for name in _RECIPIENT_FIELDS if name in scope]
    if not present:
        return None
    for name, value in present:
        if not isinstance(value, str) or not value:
            return None, f"{where}{name} is not a client id"
    if len({value for _, value in present}) > 1:
        return None, f"{where}recipientclientid and {where}recipient_client_id disagree"
    return present[0][1], None


def _event(
    raw: bytes, doc: Any, index: int | None, header_id: str | None, header_code: str | None
) -> Event:
    where = "" if index is None else f"batch element {index}: "
    if not isinstance(doc, dict):
        raise BadRequest("not_an_event", f"{where}expected a JSON object")
    envelope = _envelope(doc)
    # Adobe gives every event an id and a code; should one be missing we still publish rather
    # than drop a genuine event (a 4xx is never retried): the id is then a digest of the event's
    # own bytes (stable across Adobe's retries, so consumers can still deduplicate) and the code
    # is "unknown" (routed to `unknown.<status>`, parked in adobe.unrouted if nobody binds it).
    event_id = _first(doc, _ID_PATHS) or header_id or "sha256:" + hashlib.sha256(raw).hexdigest()
    code = _code(doc, envelope) or header_code or UNKNOWN_CODE
    payload = _get(doc, "data") if envelope == "cloudevents" else _get(doc, "event", "body")
    jid = job_id(payload)
    recipient, recipient_problem = _recipient(doc)
    return Event(
        body=raw,
        document=doc,
        envelope=envelope,
        event_id=event_id,
        event_code=code,
        recipient=recipient,
        recipient_problem=recipient_problem,
        ims_org=_first(doc, _ORG_PATHS),
        job_id=jid if jid is not None and _encodable(jid) else None,
        job_status=job_status(payload),
    )


def parse_delivery(
    raw: bytes,
    header_event_id: str | None = None,
    header_event_code: str | None = None,
    max_events: int = DEFAULT_MAX_EVENTS,
) -> Delivery:
    """Turn a verified body into a :class:`Delivery`, or raise :class:`BadRequest` (or
    :class:`PayloadTooLarge` for a batch of more than ``max_events``).

    ``header_event_id``/``header_event_code`` (``x-adobe-event-id``/``-code``) are fallbacks for
    a single delivery only: on a batch nobody says which event they describe.
    """
    check_count(raw, max_events)
    elements = batch_elements(raw)
    if elements is None:
        doc = decode_json(raw)  # strict; says what is wrong with a body that is not JSON
        if isinstance(doc, list):
            if len(doc) > max_events:  # an array the bounded count could not read
                raise PayloadTooLarge(
                    "too_many_events",
                    f"a batch of more than {max_events} events (server.max_batch_events)",
                )
            parts = split_array(raw)
            if len(parts) != len(doc):  # cannot happen for valid JSON; refuse, never guess
                raise BadRequest("bad_json", "batch could not be split into its elements")
            elements = list(zip(parts, doc, strict=True))
    if elements is not None:
        if not elements:
            raise BadRequest("empty_batch", "batch holds no events")
        events = tuple(_event(part, item, i, None, None) for i, (part, item) in enumerate(elements))
        return Delivery(events, batch=True)
    if isinstance(doc, dict):
        url = _text(doc, "validationUrl")
        if url is not None and not {"event", "specversion", "eventid", "event_id"} & set(doc):
            return Delivery((), batch=False, validation_url=url)
        return Delivery((_event(raw, doc, None, header_event_id, header_event_code),), batch=False)
    raise BadRequest("not_an_event", "body is neither an event object nor a batch array")
