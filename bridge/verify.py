"""Is this request genuinely from Adobe I/O Events? Signatures first, over the raw bytes.

Owns: the verify step of the road. Reads both signature/key-path header pairs
(``bridge.adobe.signature``), resolves the keys (``bridge.keys``) concurrently, and accepts the
request when either signature verifies, as Adobe's docs and both official SDKs do.

Verdicts: a verified signature returns; no usable signature, or signatures that do not verify
with keys we could resolve, raise :class:`Unauthenticated` (401: Adobe does not retry); when no
signature verified and a key could not be fetched because its host failed, we cannot tell, so
:class:`KeyHostUnavailable` (503: Adobe retries). Does not: check recipients (that needs the
parsed body, which is only parsed after this step).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from cryptography.hazmat.primitives.asymmetric import rsa

from bridge.adobe.signature import signed_pairs, verify
from bridge.errors import KeyHostUnavailable, Unauthenticated
from bridge.keys import KeyMissing, KeyStore


class Verifier:
    def __init__(self, keys: KeyStore) -> None:
        self._keys = keys

    async def check(self, headers: Mapping[str, str], body: bytes) -> None:
        pairs, problems = signed_pairs(headers)
        if not pairs:
            raise Unauthenticated("signature_missing", "; ".join(problems))
        keys = await asyncio.gather(
            *(self._keys.get(p.key_path) for p in pairs), return_exceptions=True
        )
        unavailable: KeyHostUnavailable | None = None
        for pair, key in zip(pairs, keys, strict=True):
            if isinstance(key, rsa.RSAPublicKey):
                if verify(key, pair.signature, body):
                    return
            elif isinstance(key, KeyHostUnavailable):
                unavailable = key
            elif not isinstance(key, KeyMissing):
                raise key  # a bug, not a verdict: let the error middleware log it
        if unavailable is not None:
            raise unavailable
        raise Unauthenticated("signature_invalid", "no signature verifies the body")
