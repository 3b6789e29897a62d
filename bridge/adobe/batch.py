"""JSON bytes, strictly: a body decoded as Adobe signed it, and a batch cut into the bytes of
its elements, unchanged.

Part of the parse step, for ``bridge.adobe.envelope``. Each element of a batch keeps its own
bytes, cut from the array: nothing is re-encoded, so numbers, escapes and key order stay exactly
as Adobe signed them. A batch of more than ``server.max_batch_events`` is refused before any
work per element. Pure: no I/O.
"""

from __future__ import annotations

import json
import re
from decimal import Decimal
from typing import Any

import orjson

from bridge.errors import BadRequest, PayloadTooLarge


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


def check_count(raw: bytes, max_events: int) -> None:
    """Refuse a batch of more than ``max_events`` before any work per element. Elements are at
    most one more than the commas, so most batches need no count at all."""
    if raw.count(b",") < max_events:
        return
    count = _count_elements(raw, max_events)
    if count is not None and count > max_events:
        raise PayloadTooLarge(
            "too_many_events", f"a batch of more than {max_events} events (server.max_batch_events)"
        )


def batch_elements(raw: bytes) -> list[tuple[bytes, Any]] | None:
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
