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

from bridge.adobe.signature import SignedPair, signed_pairs, verify
from bridge.errors import KeyHostUnavailable, Unauthenticated
from bridge.keys import KeyMissing, KeyStore


class Verifier:
    def __init__(self, keys: KeyStore) -> None:
        self._keys = keys

    async def check(self, headers: Mapping[str, str], body: bytes) -> None:
        pairs, problems = signed_pairs(headers)
        if not pairs:
            raise Unauthenticated("signature_missing", "; ".join(problems))
        await self.check_pairs(pairs, body)

    async def check_pairs(self, pairs: list[SignedPair], body: bytes) -> None:
        """Like :meth:`check`, with the headers already read (:func:`signed_pairs`)."""
        # Keys the cache holds are tried first, in header order, with no task or await: the
        # common case, where the first signature verifies, costs one RSA verification.
        unknown = []
        for pair in pairs:
            key = self._keys.cached(pair.key_path)
            if key is None:
                unknown.append(pair)
            elif isinstance(key, rsa.RSAPublicKey) and verify(key, pair.signature, body):
                return
        fetched = await asyncio.gather(
            *(self._keys.get(p.key_path) for p in unknown), return_exceptions=True
        )
        unavailable: KeyHostUnavailable | None = None
        for pair, result in zip(unknown, fetched, strict=True):
            if isinstance(result, rsa.RSAPublicKey):
                if verify(result, pair.signature, body):
                    return
            elif isinstance(result, KeyHostUnavailable):
                unavailable = result
            elif not isinstance(result, KeyMissing):
                raise result  # a bug, not a verdict: let the error middleware log it
        if unavailable is not None:
            raise unavailable
        raise Unauthenticated("signature_invalid", "no signature verifies the body")
