"""Adobe I/O Events' Journaling API and IMS's token endpoint on 127.0.0.1: a stand-in for tests.

Modelled on Adobe's documentation (``AdobeDocs/adobe-io-events`` @ 3c0b8f6), its journaling guide
``src/pages/guides/api/journaling-api.md`` (developer.adobe.com/events/docs/guides/api/
journaling_api): ``GET /events/organizations/{org}/integrations/{credential}/{registration}``
with ``x-api-key``, ``Authorization: Bearer``, ``x-ims-org-id``; no parameter: the oldest kept
events; ``since``: the events *after* a position; ``limit``: an upper bound kept in the ``next``
link, no default; ``latest=true``: jump to the end; ``seek=-PT2H``: a negative ISO-8601 duration,
never with ``since``. ``200``: ``{"events": [{"position", "event"}], "_page": {"last", "count"}}``
and ``Link: <relative>; rel="next"``; the end: ``204`` with ``retry-after``, ``next`` equal to the
request and ``rel="validate"`` (each ``Link`` a header line of its own); an expired position:
``410`` "Events at position … have expired." (text). Its ``static/events-api-reference.yaml``:
``limit`` is int32, pages are at most 1.5 MB, ``/validate`` needs ``since``, ``401`` is a bad
token and ``403`` a bad scope (``adobeio_api``). IMS (developer.adobe.com/developer-console/docs/
guides/authentication/ServerToServerAuthentication/ims): ``POST /ims/token/v3``, form or query
``grant_type=client_credentials&client_id&client_secret&scope`` (commas) gives ``{"access_token",
"token_type": "bearer", "expires_in": seconds}``.

Inferred: the gateway's error bodies (``{"error_code": "401013", "message": "Oauth token is not
valid"}``, ``403003`` "Api Key is invalid": Adobe's answers quoted in public issue threads), IMS's
``400 {"error": "invalid_client", "error_description": "invalid client_secret parameter"}``, and
``400`` for a position never issued, a bad ``seek`` or two start points at once. Positions are
opaque (``moose:<uuid>:<uuid>``), ordered by the journal, not as strings.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import web
from multidict import CIMultiDict

TOKEN_PATH = "/ims/token/v3"
_WORDS = ("camel", "moose", "rabbit", "penguin", "otter", "heron", "lynx", "bison", "ibex")
# Java's Duration.parse, negative only: days, hours, minutes, seconds (no weeks, months, years).
_SEEK = re.compile(
    r"-P(?:(\d+)D)?(?:T(?=\d)(?:(\d+)H)?(?:(\d+)M)?(?:(\d+(?:[.,]\d{1,9})?)S)?)?", re.IGNORECASE
)
_PAGE_OVERHEAD = 160  # '{"events":[],"_page":{"last":"<position>","count":N}}' with room to spare


@dataclass
class _Entry:
    position: str
    at: datetime
    blob: bytes | None  # b'{"position":...,"event":...}'; None once expired


@dataclass
class _Token:
    client_id: str
    scopes: frozenset[str]
    expires: float  # time.monotonic()
    revoked: bool = False


class _Refused(Exception):
    """An answer that ends the request here: ``args[0]``, a response."""


def _seconds(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _gateway(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error_code": code, "message": message}, status=status)


def _bad(message: str) -> _Refused:
    return _Refused(_gateway(400, "400", message))


def _bearer(request: web.Request) -> str:
    parts = request.headers.get("Authorization", "").split(None, 1)
    return parts[1].strip() if len(parts) == 2 and parts[0].lower() == "bearer" else ""


def _seek(value: str) -> timedelta:
    match = _SEEK.fullmatch(value)
    if match is None or not any(match.groups()):
        raise _bad(f"seek must be a negative ISO-8601 duration such as -PT2H, not {value!r}")
    days, hours, minutes, secs = (float((g or "0").replace(",", ".")) for g in match.groups())
    span = timedelta(days=days, hours=hours, minutes=minutes, seconds=secs)
    if span <= timedelta(0):
        raise _bad(f"seek must go back in time, not {value!r}")
    return span


class JournalServer:
    """Adobe's journal and IMS on 127.0.0.1, in a thread of its own (its own event loop), so that
    sync tests (which sleep) and async tests can both use it. Thread-safe methods."""

    def __init__(
        self,
        *,
        client_id: str = "journal-client",
        client_secret: str = "journal-secret",
        org_id: str = "ORG1@AdobeOrg",
        token_seconds: int = 3600,
        retry_after: float = 1,
        page_cap_bytes: int = 1_500_000,
        registration_id: str | None = None,
        required_scope: str | None = "adobeio_api",
        extra_links: bool = False,
    ) -> None:
        self.client_id = client_id
        self.client_secret = client_secret
        self.org_id = org_id
        self.token_seconds = token_seconds
        self.retry_after = retry_after
        self.page_cap_bytes = page_cap_bytes
        self.required_scope = required_scope
        self.extra_links = extra_links  # rel="events", "latest", "page", "seek" as aio-lib-events
        self.path = "/events/organizations/23294/integrations/54108/" + (
            registration_id or str(uuid.uuid4())
        )
        self.requests: list[dict[str, Any]] = []
        self.token_requests = 0
        self.token_log: list[dict[str, Any]] = []  # {"status", "client_id", "scope"} per POST
        self.positions: list[str] = []
        # Kept out of pages by a subscriber-defined filter (ADOBE-EVENTS.md §5), yet counted in
        # a page's ``limit``: a page of them is an empty 200 whose next link moves on.
        self.filtered: set[str] = set()
        self.port = 0
        self._entries: list[_Entry] = []
        self._index: dict[str, int] = {}
        self._first = 0  # the oldest kept entry
        self._tokens: dict[str, _Token] = {}
        self._faults: list[tuple[int, float | None]] = []
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None

    def __enter__(self) -> JournalServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("the journal server is already running")
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=self._run, args=(loop,), name="adobe-journal", daemon=True)
        self._loop, self._thread = loop, thread
        thread.start()
        try:
            self.port = asyncio.run_coroutine_threadsafe(self._serve(), loop).result(timeout=10)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        loop, thread, runner = self._loop, self._thread, self._runner
        if loop is None or thread is None:
            return
        if runner is not None:
            asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        self._loop = self._thread = self._runner = None
        self.port = 0

    @staticmethod
    def _run(loop: asyncio.AbstractEventLoop) -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
        finally:
            loop.close()

    async def _serve(self) -> int:
        app = web.Application()
        app.router.add_get(self.path, self._journal)
        app.router.add_get(self.path + "/validate", self._journal)
        app.router.add_post(TOKEN_PATH, self._token)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        self._runner = runner
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        return int(runner.addresses[0][1])

    @property
    def origin(self) -> str:
        if not self.port:
            raise RuntimeError("the journal server is not running")
        return f"http://127.0.0.1:{self.port}"

    @property
    def journal_url(self) -> str:
        return self.origin + self.path

    @property
    def token_url(self) -> str:
        return self.origin + TOKEN_PATH

    def add(self, event: dict[str, Any] | bytes, *, at: datetime | None = None) -> str:
        """Append one event (its JSON as given when bytes); ``at`` is its time for ``seek``."""
        body = event if isinstance(event, bytes) else json.dumps(event).encode()
        if not isinstance(json.loads(body), dict):
            raise ValueError("a journal event is a JSON object")
        when = datetime.now(UTC) if at is None else at if at.tzinfo else at.replace(tzinfo=UTC)
        with self._lock:
            position = f"{secrets.choice(_WORDS)}:{uuid.uuid4()}:{uuid.uuid4()}"
            blob = b'{"position":"' + position.encode() + b'","event":' + body + b"}"
            self._index[position] = len(self._entries)
            self._entries.append(_Entry(position, when, blob))
            self.positions.append(position)
        return position

    def add_many(self, events: Iterable[dict[str, Any]]) -> list[str]:
        return [self.add(event) for event in events]

    def expire(self, count: int) -> None:
        """The oldest ``count`` kept events leave (7 days passed): ``since`` them answers 410."""
        with self._lock:
            stop = min(self._first + count, len(self._entries))
            for entry in self._entries[self._first : stop]:
                entry.blob = None
            self._first = stop

    def fail_next(self, status: int, times: int = 1, retry_after: float | None = None) -> None:
        with self._lock:
            self._faults.extend([(status, retry_after)] * times)

    def revoke_tokens(self) -> None:
        with self._lock:
            for token in self._tokens.values():
                token.revoked = True

    def issue_token(self, scope: str = "adobeio_api") -> str:
        """A valid token without a round trip to IMS (not counted in ``token_requests``)."""
        with self._lock:
            return self._issue(self.client_id, scope)

    def _issue(self, client_id: str, scope: str) -> str:
        token, scopes = secrets.token_urlsafe(32), frozenset(re.split(r"[,\s]+", scope)) - {""}
        self._tokens[token] = _Token(client_id, scopes, time.monotonic() + self.token_seconds)
        return token

    async def _token(self, request: web.Request) -> web.Response:
        form = dict(request.query)
        form.update((k, v) for k, v in (await request.post()).items() if isinstance(v, str))
        with self._lock:
            self.token_requests += 1
            status, body = self._grant(form)
            entry = {"status": status, "client_id": form.get("client_id", "")}
            self.token_log.append({**entry, "scope": form.get("scope", "")})
        return web.json_response(body, status=status)

    def _grant(self, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        def refuse(error: str, description: str) -> tuple[int, dict[str, Any]]:
            return 400, {"error": error, "error_description": description}

        if form.get("grant_type") != "client_credentials":
            return refuse("unsupported_grant_type", "unsupported grant_type parameter")
        if form.get("client_id") != self.client_id:
            return refuse("invalid_client", "invalid client_id parameter")
        if form.get("client_secret") != self.client_secret:
            return refuse("invalid_client", "invalid client_secret parameter")
        if not form.get("scope"):
            return refuse("invalid_scope", "missing scope parameter")
        token = self._issue(self.client_id, form["scope"])
        seconds = self.token_seconds
        return 200, {"access_token": token, "token_type": "bearer", "expires_in": seconds}

    async def _journal(self, request: web.Request) -> web.Response:
        with self._lock:
            try:
                response, count = self._answer(request)
            except _Refused as refused:
                response, count = refused.args[0], 0
            record = {"path": request.path, "query": dict(request.query), "token": _bearer(request)}
            self.requests.append({**record, "status": response.status, "events": count})
        return response

    def _answer(self, request: web.Request) -> tuple[web.Response, int]:
        if self._faults:
            status, wait = self._faults.pop(0)
            response = _gateway(status, str(status), f"injected failure {status}")
            if wait is not None:
                response.headers["Retry-After"] = _seconds(wait)
            return response, 0
        self._authorize(request)
        start, limit = self._start(request)
        if start is None or start >= len(self._entries):
            return self._no_content(request, limit), 0
        return self._page(start, limit)

    def _authorize(self, request: web.Request) -> None:
        key = request.headers.get("x-api-key", "")
        if not key:
            raise _Refused(_gateway(403, "403000", "Api Key is required"))
        if key != self.client_id:
            raise _Refused(_gateway(403, "403003", "Api Key is invalid"))
        token = self._tokens.get(_bearer(request))
        if token is None or token.revoked or token.expires <= time.monotonic():
            raise _Refused(_gateway(401, "401013", "Oauth token is not valid"))
        if self.required_scope and self.required_scope not in token.scopes:
            raise _Refused(_gateway(403, "403", f"the token lacks {self.required_scope}"))
        if request.headers.get("x-ims-org-id") != self.org_id:
            raise _Refused(_gateway(403, "403", "x-ims-org-id is not the registration's org"))

    def _start(self, request: web.Request) -> tuple[int | None, int | None]:
        """The index of the first event to answer (``None``: the end) and the ``limit``."""
        query = request.query
        limit = None
        if "limit" in query:
            text = query["limit"]
            if not text.isdigit() or not 0 < int(text) < 2**31:
                raise _bad(f"limit must be a positive integer, not {text!r}")
            limit = int(text)
        latest = query.get("latest", "false").lower()
        if latest not in ("true", "false"):
            raise _bad(f"latest must be true or false, not {query['latest']!r}")
        starts = [name for name in ("since", "seek") if name in query]
        starts += ["latest"] if latest == "true" else []
        if len(starts) > 1:
            raise _bad(f"{' and '.join(starts)} cannot be used together")
        if request.path.endswith("/validate") and "since" not in query:
            raise _bad("since is required")
        if "since" in query:
            return self._after(query["since"]), limit
        if "seek" in query:
            cutoff = datetime.now(UTC) - _seek(query["seek"])
            kept = range(self._first, len(self._entries))
            return next((i for i in kept if self._entries[i].at >= cutoff), None), limit
        return (None if latest == "true" else self._first), limit

    def _after(self, position: str) -> int:
        index = self._index.get(position)
        if index is None:
            raise _bad(f"Invalid position {position}")
        if index < self._first:
            text = f"Events at position {position} have expired."
            raise _Refused(web.Response(status=410, text=text))
        return index + 1

    def _link(self, limit: int | None, since: str | None = None) -> str:
        query = [f"since={since}"] if since else []
        query += [f"limit={limit}"] if limit is not None else []
        return self.path + ("?" + "&".join(query) if query else "")

    def _headers(self, next_link: str, since: str | None, end: bool) -> CIMultiDict[str]:
        headers: CIMultiDict[str] = CIMultiDict()
        if end:
            headers["retry-after"] = _seconds(self.retry_after)
        if self.extra_links:
            headers.add("Link", f'<{self.path}>; rel="events"')
        headers.add("Link", f'<{next_link}>; rel="next"')
        if self.extra_links:
            headers.add("Link", f'<{self.path}?latest=true>; rel="latest"')
            headers.add("Link", f'<{self.path}?since={{position}}&limit={{count}}>; rel="page"')
            headers.add("Link", f'<{self.path}?seek={{duration}}&limit={{count}}>; rel="seek"')
        if end and since:
            headers.add("Link", f'<{self.path}/validate?since={since}>; rel="validate"')
        return headers

    def _no_content(self, request: web.Request, limit: int | None) -> web.Response:
        """The end: with ``since``, ``next`` is this request; else it continues from the end."""
        since = request.query.get("since")
        if since is not None:
            next_link = self.path + "?" + request.rel_url.raw_query_string
        else:
            kept = len(self._entries) > self._first
            since = self._entries[-1].position if kept else None
            next_link = self._link(limit, since)
        return web.Response(status=204, headers=self._headers(next_link, since, end=True))

    def _page(self, start: int, limit: int | None) -> tuple[web.Response, int]:
        blobs: list[bytes] = []
        size, scanned = _PAGE_OVERHEAD, 0
        for entry in self._entries[start:]:
            assert entry.blob is not None  # start is never before the oldest kept entry
            if limit is not None and scanned >= limit:
                break
            if blobs and size + len(entry.blob) + 1 > self.page_cap_bytes:
                break
            scanned += 1
            if entry.position not in self.filtered:
                blobs.append(entry.blob)
                size += len(entry.blob) + 1
        last = self._entries[start + scanned - 1].position
        page = json.dumps({"last": last, "count": len(blobs)}, separators=(",", ":")).encode()
        body = b'{"events":[' + b",".join(blobs) + b'],"_page":' + page + b"}"
        headers = self._headers(self._link(limit, last), last, end=False)
        response = web.Response(body=body, content_type="application/json", headers=headers)
        return response, len(blobs)
