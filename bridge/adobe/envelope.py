"""Raw (already verified) body bytes → the events inside it.

Adobe delivers one event per request, or a JSON array of events (batch delivery, up to 20 events
and 2 MB), each in one of two envelopes:

- ``adobe_io`` (legacy): ``{"event_id": ..., "event": {"header": {...}, "body": {...}}}``;
- CloudEvents 1.0: ``{"specversion": "1.0", "type": ..., "eventid": ..., "data": {...}}``.

A body of only ``{"validationUrl": ...}`` is Adobe's asynchronous URL validation, not an event.
Any other JSON object is taken as a bare event when its id and code can be found.

Owns: the event id (``eventid``, else ``event_id``, else the ``x-adobe-event-id`` header on a
single delivery; never the CloudEvents ``id``; failing all three, ``sha256:`` + the hex digest
of the event's bytes), the event code (CloudEvents ``type``, else
``event.header.eventCode`` or ``event.header._adobeio.eventCode``, else the type of a CloudEvent
wrapped in ``event.body``, else the ``x-adobe-event-code`` header on a single delivery, else
``unknown``), the recipient (SPEC §4: the top-level ``recipientclientid``, else the top-level
``recipient_client_id``, the two agreeing when both are there; inside ``event`` only in Marketo's
wrapped form, whose ``event.body`` is itself a CloudEvent, and only when the top has none), the
IMS org, and the job id and aggregate status
(``bridge.adobe.jobstatus``).
Each event keeps its own bytes: the whole body for a single delivery, and for a batch the
element's bytes cut from the array unchanged, so nothing is re-encoded and numbers, escapes and
key order stay exactly as Adobe signed them.

Does not: check signatures or recipients (the receiver does), or touch the network.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import orjson

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


def decode_json(raw: bytes) -> Any:
    """Parse JSON strictly: UTF-8 only, no NaN/Infinity, no BOM.

    orjson first (fast); the standard library second, because orjson refuses some valid JSON
    (lone surrogate escapes) that Adobe could still have signed.
    """
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        pass
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("bad_utf8", "body is not valid UTF-8") from None

    def no_constants(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    def big_int(digits: str) -> int | Decimal:
        # Python refuses int() of 4,300+ digits; such a number is still JSON, and the body is
        # published as received anyway: keep it as a Decimal in the parsed view.
        return int(digits) if len(digits) < 4000 else Decimal(digits)

    try:
        return json.loads(text, parse_constant=no_constants, parse_int=big_int)
    except (ValueError, RecursionError) as exc:
        message = str(exc).split(":")[0] if str(exc) else type(exc).__name__
        raise BadRequest("bad_json", f"body is not JSON: {message}") from None


# A JSON string (unrolled loop, so long strings cost one regex step) or a structural byte.
_TOKEN = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{},]', re.DOTALL)


# The standard library's scanner, in C, finds where each element of an array ends while it
# parses it, so a batch is parsed and cut into its elements' bytes in one pass. _BOUNDS only
# cuts: numbers become their length (a C builtin, no Python call). _VALUES parses too, refusing
# NaN and Infinity; an integer of 4,300+ digits makes it fail, and the slow path takes over.
_BOUNDS = json.JSONDecoder(parse_int=len, parse_float=len, parse_constant=len)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


_VALUES = json.JSONDecoder(parse_constant=_refuse_constant)
_SPACE = re.compile(r"[ \t\r\n]*")


def split_array(raw: bytes) -> list[bytes]:
    """The raw bytes of each top-level element of ``raw``, a valid JSON array."""
    try:
        return [part for part, _ in _scan_array(raw, _BOUNDS)]
    except (ValueError, RecursionError, IndexError):  # very deep nesting: the slow way
        return _split_tokens(raw)


def _scan_array(raw: bytes, decoder: json.JSONDecoder) -> list[tuple[bytes, Any]]:
    """Each element of the JSON array ``raw``: its exact bytes and its value.

    Raises ValueError (or RecursionError) for anything but one array and whitespace."""
    text = raw.decode("utf-8")
    same = len(text) == len(raw)  # ASCII: string and byte positions agree
    at = _skip(text, 0)
    if text[at] != "[":
        raise ValueError("not an array")
    at = _skip(text, at + 1)
    elements: list[tuple[bytes, Any]] = []
    if text[at] != "]":
        while True:
            value, end = decoder.raw_decode(text, at)
            elements.append((raw[at:end] if same else text[at:end].encode(), value))
            at = _skip(text, end)
            if text[at] == "]":
                break
            if text[at] != ",":
                raise ValueError("not an array")
            at = _skip(text, at + 1)
    if _skip(text, at + 1) != len(text):
        raise ValueError("data after the array")
    return elements


def _count_elements(raw: bytes, limit: int) -> int | None:
    """How many elements the JSON array ``raw`` has, counting no further than ``limit + 1``;
    None when it is not an array the scanner reads (the parse that follows says why)."""
    try:
        text = raw.decode("utf-8")
        at = _skip(text, 0)
        if text[at] != "[":
            return None
        at = _skip(text, at + 1)
        if text[at] == "]":
            return 0
        count = 0
        while count <= limit:
            _, end = _BOUNDS.raw_decode(text, at)
            count += 1
            at = _skip(text, end)
            if text[at] == "]":
                break
            if text[at] != ",":
                return None
            at = _skip(text, at + 1)
    except (ValueError, RecursionError, IndexError):
        return None
    return count


def _check_count(raw: bytes, max_events: int) -> None:
    """Refuse a batch of more than ``max_events`` before any work per element. Elements are at
    most one more than the commas, so most batches need no count at all."""
    if raw.count(b",") < max_events:
        return
    count = _count_elements(raw, max_events)
    if count is not None and count > max_events:
        raise PayloadTooLarge(
            "too_many_events", f"a batch of more than {max_events} events (server.max_batch_events)"
        )


def _batch_elements(raw: bytes) -> list[tuple[bytes, Any]] | None:
    """A batch body's elements in one pass, or None when the careful path must decide."""
    if raw[:1] != b"[":
        return None
    if raw[:2] == b"[{":  # pretty-printed arrays start otherwise: only the scanner then
        compact = _compact_elements(raw)
        if compact is not None:
            return compact
    try:
        return _scan_array(raw, _VALUES)
    except (ValueError, RecursionError, IndexError):
        return None


def _compact_elements(raw: bytes) -> list[tuple[bytes, Any]] | None:
    """The elements of a compact array (no spaces, as Adobe's serializer writes it), or None.

    orjson parses the array and writes each element again; when those bytes, joined by commas
    in brackets, are the body itself, they are exactly the elements' bytes as received. Anything
    else (spaces, escapes orjson writes differently, ``1e5``, integers over 64 bits) differs
    somewhere and is left to the standard library's scanner.
    """
    try:
        docs = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(docs, list):
        return None
    try:
        parts = [orjson.dumps(doc) for doc in docs]
    except orjson.JSONEncodeError:  # nesting deeper than orjson writes
        return None
    if b"[" + b",".join(parts) + b"]" != raw:
        return None
    return list(zip(parts, docs, strict=True))


def _skip(text: str, at: int) -> int:
    """The position of the first non-whitespace character from ``at``."""
    space = _SPACE.match(text, at)
    return space.end() if space else at


def _split_tokens(raw: bytes) -> list[bytes]:
    depth = 0
    start = 0
    parts: list[bytes] = []
    for match in _TOKEN.finditer(raw):
        token = match.group()
        first = token[:1]
        if first == b'"':
            continue
        if first in (b"[", b"{"):
            depth += 1
            if depth == 1:
                start = match.end()
        elif first in (b"]", b"}"):
            depth -= 1
            if depth == 0:
                parts.append(raw[start : match.start()])
                break
        elif depth == 1:  # a comma between elements
            parts.append(raw[start : match.start()])
            start = match.end()
    parts = [p.strip(b" \t\r\n") for p in parts]
    return [] if parts == [b""] else parts


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
_ORG_PATHS = (
    ("event", "header", "imsOrgId"),
    ("event", "header", "_adobeio", "imsOrgId"),
    ("imsorgid",),
    ("imsOrgId",),
    ("data", "imsOrgId"),
    ("event", "body", "data", "imsOrgId"),
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
    """(the recipient, or None and why not), by SPEC §4.

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
    _check_count(raw, max_events)
    elements = _batch_elements(raw)
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
