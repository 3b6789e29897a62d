"""Adobe's two handshakes, pure: the challenge a registration's URL must echo, and the
validation URL Adobe may POST instead (unsigned), for an operator to open.

Part of the parse step. Adobe I/O Events checks a webhook URL when a registration is made or
changed: by ``GET <url>?challenge=…`` (the answer echoes the value), or by a POST with a
``validationUrl`` to open within 5 minutes (the README, "Quick start").
"""

from __future__ import annotations

import re
from typing import Final

from yarl import URL

from bridge.adobe.envelope import Delivery, parse_delivery
from bridge.errors import Refusal

# Adobe's challenge values are UUIDs; accept a little more, never markup or quotes.
CHALLENGE: Final = re.compile(r"^[A-Za-z0-9._~-]{1,256}$")
# Adobe's asynchronous validation URL: https://csm.adobe.io/csm/registrations/validate?id=…
VALIDATION_HOST: Final = "csm.adobe.io"
_URL_TEXT: Final = re.compile(r"^[A-Za-z0-9._~:/?#\[\]@!$&'()*+,;=%-]{1,2048}$")


def adobe_validation_url(text: str) -> bool:
    """``https://csm.adobe.io/…`` on the default port, without user info: the URL Adobe sends,
    written plainly (no backslash, space or control character for a browser to read otherwise)."""
    if not _URL_TEXT.fullmatch(text):
        return False
    try:
        url = URL(text)
        authority = url.raw_authority
    except ValueError:
        return False
    return url.scheme == "https" and authority.lower() in (
        VALIDATION_HOST,
        f"{VALIDATION_HOST}:443",
    )


def try_validation(body: bytes) -> Delivery | None:
    """The validation handshake, if that is what an unsigned ``body`` is."""
    try:
        delivery = parse_delivery(body)
    except Refusal:
        return None
    return delivery if delivery.validation_url is not None else None
