"""Adobe I/O Events digital signatures, checked over the raw request bytes.

Adobe signs the exact body with RSASSA-PKCS1-v1_5 / SHA-256 under two key pairs and sends
``x-adobe-digital-signature-1``/``-2`` (standard base64) with ``x-adobe-public-key1-path``/
``-2-path``; a request is genuine when either signature verifies with the key named beside it
(https://developer.adobe.com/events/docs/guides/#security-considerations).

Owns: the key-path rule, public-key parsing and its strength rules, signature decoding and the
RSA check. Does not: fetch keys (``bridge.keys``), parse JSON, or decide HTTP statuses.
"""

from __future__ import annotations

import base64
import binascii
import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

SIGNATURE_HEADERS = ("x-adobe-digital-signature-1", "x-adobe-digital-signature-2")
KEY_PATH_HEADERS = ("x-adobe-public-key1-path", "x-adobe-public-key2-path")

# The only paths we ever fetch: no query, no dots, no other folder, no scheme or host.
KEY_PATH = re.compile(r"^/prod/keys/pub-key-[A-Za-z0-9_-]{1,128}\.pem$")
MAX_KEY_PATH = len("/prod/keys/pub-key-.pem") + 128
_BASE64 = re.compile(r"^[A-Za-z0-9+/]+={0,2}$")

MIN_RSA_BITS = 2048
MAX_RSA_BITS = 8192


@dataclass(frozen=True)
class SignedPair:
    """One signature with the path of the key that should verify it."""

    signature: bytes
    key_path: str


class BadKey(ValueError):
    """The key material is not an acceptable RSA public key."""


def key_path_allowed(path: str) -> bool:
    # Anything longer than an allowed path is refused before it can take a cache entry.
    return len(path) <= MAX_KEY_PATH and _matches_key_path(path)


@functools.lru_cache(maxsize=1024)  # every request asks about the same two paths
def _matches_key_path(path: str) -> bool:
    return KEY_PATH.fullmatch(path) is not None


def signed_pairs(headers: Mapping[str, str]) -> tuple[list[SignedPair], list[str]]:
    """Read the signature/key-path header pairs.

    Adobe always sends all four headers; like Adobe's Java SDK we require all four, so a request
    missing one is refused whatever the other pair says. Returns the usable pairs and, for each
    unusable one, a short reason. A pair is usable when its signature is strict base64 and its
    key path is allowed. ``headers`` must be case-insensitive (aiohttp's are).
    """
    missing = [h for h in (*SIGNATURE_HEADERS, *KEY_PATH_HEADERS) if not headers.get(h, "").strip()]
    if missing:
        return [], [f"header missing: {', '.join(missing)}"]
    pairs: list[SignedPair] = []
    problems: list[str] = []
    for n, (sig_header, path_header) in enumerate(
        zip(SIGNATURE_HEADERS, KEY_PATH_HEADERS, strict=True), 1
    ):
        sig_text = headers[sig_header].strip()
        path = headers[path_header].strip()
        if not key_path_allowed(path):
            problems.append(f"signature {n}: key path not allowed")
            continue
        if len(sig_text) > 2048 or not _BASE64.match(sig_text):
            problems.append(f"signature {n}: not base64")
            continue
        try:
            signature = base64.b64decode(sig_text, validate=True)
        except (binascii.Error, ValueError):
            problems.append(f"signature {n}: not base64")
            continue
        pairs.append(SignedPair(signature, path))
    return pairs, problems


def load_public_key(pem: bytes) -> rsa.RSAPublicKey:
    """Parse a PEM SubjectPublicKeyInfo RSA key of 2048 to 8192 bits, or raise :class:`BadKey`."""
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError) as exc:  # cryptography's errors for bad PEM/DER
        raise BadKey("not a PEM public key") from exc
    if not isinstance(key, rsa.RSAPublicKey):
        raise BadKey("not an RSA key")
    if not MIN_RSA_BITS <= key.key_size <= MAX_RSA_BITS:
        raise BadKey(f"RSA key of {key.key_size} bits")
    return key


def verify(key: rsa.RSAPublicKey, signature: bytes, body: bytes) -> bool:
    """True when ``signature`` is ``key``'s PKCS#1 v1.5 SHA-256 signature of exactly ``body``."""
    try:
        key.verify(signature, body, padding.PKCS1v15(), hashes.SHA256())
    except InvalidSignature:
        return False
    return True
