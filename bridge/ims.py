"""IMS access tokens for the journal: OAuth Server-to-Server (``client_credentials``), cached and
renewed before they expire, and at once after a ``401``.

Adobe's IMS answers ``POST /ims/token/v3`` (form: ``grant_type=client_credentials``,
``client_id``, ``client_secret``, ``scope``) with ``{"access_token", "token_type": "bearer",
"expires_in": <seconds>}``; tokens live 24 h. A token is renewed when a tenth of its life (at
least a minute, at most an hour) is left, so a page request never leaves with one about to
expire. The secret is never logged; an IMS refusal is reported by its ``error`` word only.

Owns: the token and when to ask for another. Does not: read the journal (``bridge.journal``).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from typing import Final

import aiohttp
import orjson
import structlog

from bridge import metrics
from bridge.adobe.journal import JournalProblem
from bridge.config_types import ImsConfig

log = structlog.get_logger("bridge.ims")

MAX_ANSWER_BYTES: Final = 64 * 1024
MIN_MARGIN: Final = 60.0
MAX_MARGIN: Final = 3600.0
RETRY_RENEWAL: Final = 30.0  # seconds between tries while a failed renewal leaves a live token
# A URL's user and password, up to the last "@" before its path: masked in what is logged.
_USERINFO: Final = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)[^\s/?#]*@")


class Tokens:
    """The current access token of one credential, renewed as needed (one request at a time)."""

    def __init__(
        self,
        config: ImsConfig,
        session: aiohttp.ClientSession,
        timeout: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config, self.session, self.timeout, self.clock = config, session, timeout, clock
        self._token: str | None = None
        self._renew_at = self._expires_at = 0.0
        self._lock = asyncio.Lock()
        self._reason = "first"

    async def token(self) -> str:
        """A token to send now: the cached one, or a new one."""
        async with self._lock:
            if self._token is None or self.clock() >= self._renew_at:
                try:
                    await self._renew()
                except JournalProblem as problem:
                    if self._token is None or self.clock() >= self._expires_at:
                        raise
                    # IMS did not give the next one, but this one has a while to live: use
                    # it, and ask again in a little while, not at every request.
                    self._renew_at = min(self.clock() + RETRY_RENEWAL, self._expires_at)
                    log.warning("ims_token_not_renewed", detail=problem.detail, action="retrying")
            assert self._token is not None
            return self._token

    def rejected(self, token: str) -> None:
        """The journal answered ``401`` to ``token``: the next :meth:`token` asks IMS again."""
        if token == self._token:
            self._token, self._reason = None, "rejected"

    async def _renew(self) -> None:
        reason = self._reason if self._token is None else "expiring"
        form = {
            "grant_type": "client_credentials",
            "client_id": self.config.client_id,
            "client_secret": self.config.client_secret,
            "scope": ",".join(self.config.scopes),
        }
        try:
            async with self.session.post(
                self.config.token_url,
                data=form,
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                allow_redirects=False,
            ) as answer:
                body = await _read_capped(answer.content)
                status = answer.status
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            # Not the credential's fault: retried like any network problem, also by a one-shot.
            detail = f"IMS token request failed: {problem_text(exc)}"
            raise JournalProblem("network", detail) from None
        access, lifetime = _read(status, body)
        self._token = access
        self._expires_at = self.clock() + lifetime
        margin = min(max(lifetime / 10, MIN_MARGIN), MAX_MARGIN)
        self._renew_at = self.clock() + max(lifetime - margin, lifetime / 2)
        self._reason = "expiring"
        metrics.JOURNAL_TOKEN_RENEWALS.labels(reason).inc()
        log.info("ims_token_obtained", reason=reason, expires_in=int(lifetime))


def _read(status: int, body: bytes) -> tuple[str, float]:
    """(access token, lifetime in seconds) from IMS's answer, or why not."""
    try:
        doc = orjson.loads(body) if len(body) <= MAX_ANSWER_BYTES else None
    except orjson.JSONDecodeError:
        doc = None
    if status != 200:
        word = doc.get("error") if isinstance(doc, dict) else None
        said = f" ({word})" if isinstance(word, str) and word.isascii() and len(word) < 64 else ""
        raise JournalProblem("token", f"IMS refused the credential with {status}{said}")
    if not isinstance(doc, dict):
        raise JournalProblem("token", "IMS answered 200 without a JSON object")
    access, expires = doc.get("access_token"), doc.get("expires_in")
    if not isinstance(access, str) or not access or not access.isascii():
        raise JournalProblem("token", "IMS answered 200 without an access_token")
    if isinstance(expires, str) and expires.isdigit():
        expires = int(expires)
    if not isinstance(expires, int | float) or isinstance(expires, bool) or expires <= 0:
        expires = 3600  # not said: an hour, and a 401 renews it sooner
    if expires > 10**7:  # milliseconds (IMS's v2 endpoints said expires_in in ms)
        expires = expires / 1000
    return access, float(expires)


async def _read_capped(content: aiohttp.StreamReader) -> bytes:
    """The body to its end, or its first ``MAX_ANSWER_BYTES + 1`` bytes: ``read(n)`` gives what
    has come so far, which may be a piece of it."""
    body = b""
    while len(body) <= MAX_ANSWER_BYTES:
        chunk = await content.read(MAX_ANSWER_BYTES + 1 - len(body))
        if not chunk:
            break
        body += chunk
    return body


def problem_text(exc: BaseException) -> str:
    """A request's failure in one line for a log, with no credential: a proxy's refusal of
    ``CONNECT`` by its status (aiohttp's text of it holds the proxy URL, password and all), and
    the user and password of any URL in the rest masked."""
    if isinstance(exc, aiohttp.ClientHttpProxyError):
        return f"the proxy answered {exc.status} ({exc.message})"
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return _USERINFO.sub(r"\1***@", text)
