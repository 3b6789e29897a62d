"""The receive and answer steps: the aiohttp edge of the road.

    receive (content type and encoding, size, the signature headers' shape, the body in time)
    → the intake (``bridge.intake``: verify → parse → authorize → dedup → route → build →
    deliver) → answer (200 only when all is safe)

Owns: the handlers for ``POST <path>`` (events, batches and the ``validationUrl`` handshake) and
``GET <path>?challenge=…``, and the one error middleware that maps :class:`Refusal` to HTTP (and
aiohttp's own 404 and 405 to the same JSON), writes the canonical log line and counts the
request. Each registration gets its own path.

Cost order, so that nobody without a signature can deny service to those with one: what is
cheap is refused first, before the body is read (content type and encoding, the size, the
signature headers' shape: a request that cannot verify takes nothing); the body must arrive
within ``server.body_timeout``; only then is the signature checked, and only a verified request
takes one of the ``server.max_in_flight`` slots (more get a 429) for the rest of the road.

Every answer comes within ``server.answer_deadline`` (7.5 s; Adobe gives up at 10 s): whatever
runs out of time is a 503 (Adobe retries it). A client that goes away mid-request is logged as
``client_gone`` (counted as status 499, as nginx does), not as a failure of ours. Does not: know
AMQP, verify, route, or parse JSON.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import UTC, datetime
from functools import partial
from typing import Any, Final

import orjson
import structlog
from aiohttp import web

from bridge import metrics
from bridge.adobe.handshake import CHALLENGE
from bridge.adobe.signature import KEY_PATH_HEADERS, SIGNATURE_HEADERS, SignedPair, signed_pairs
from bridge.config import Config
from bridge.connections import GuardedHandler, mark_busy
from bridge.errors import (
    RETRYABLE,
    BadRequest,
    ClientGone,
    PayloadTooLarge,
    Refusal,
    Unauthenticated,
    Unavailable,
    UnsupportedMediaType,
)
from bridge.intake import Arrival, Intake
from bridge.message import header_text
from bridge.outbox import Outbox
from bridge.publisher import Publisher
from bridge.tracing import TracedIntake, Tracing
from bridge.verify import Verifier

log = structlog.get_logger("bridge.receiver")

# Per-request fields for the canonical log line; handlers add to it as they learn things.
LOG_FIELDS: Final = web.RequestKey("log_fields", dict)

JSON_TYPES: Final = frozenset(
    {"application/json", "application/cloudevents+json", "application/cloudevents-batch+json"}
)
VALIDATION_PEEK_BYTES: Final = 4096
DEADLINE: Final = web.RequestKey("deadline", float)  # the loop time the answer is due
_HTTP_REASONS: Final = {404: "not_found", 405: "method_not_allowed"}


def json_response(
    status: int, payload: dict[str, Any], headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        status=status,
        body=orjson.dumps(payload),
        content_type="application/json",
        headers={"X-Content-Type-Options": "nosniff", **(headers or {})},
    )


@web.middleware
async def answer_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Map refusals to HTTP (the only place), then log and count webhook requests."""
    fields: dict[str, Any] = {}
    request[LOG_FIELDS] = fields
    protocol = request.protocol
    guarded = protocol if isinstance(protocol, GuardedHandler) else None
    if guarded is not None:
        guarded.request_started()
    started = time.perf_counter()
    outcome = "ok"
    response: web.StreamResponse
    try:
        response = await handler(request)
        outcome = fields.pop("outcome", outcome)
    except Refusal as refusal:
        outcome = refusal.reason
        fields["detail"] = refusal.detail
        headers = {}
        if isinstance(refusal, RETRYABLE):
            headers["Retry-After"] = str(refusal.retry_after)
        response = json_response(
            refusal.status, {"error": refusal.reason, "detail": refusal.detail}, headers
        )
        if refusal.close or isinstance(refusal, ClientGone):
            response.force_close()
    except web.HTTPException as exc:  # the router's 404 and 405: the same JSON as every refusal
        reason = _HTTP_REASONS.get(exc.status, f"http_{exc.status}")
        kept = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "retry-after")}
        response = json_response(exc.status, {"error": reason, "detail": exc.reason}, kept)
    except Exception:  # the last resort: log the bug with its traceback, answer 500, keep serving
        log.exception("request_crashed", method=request.method, path=request.path)
        outcome = "crashed"
        response = json_response(500, {"error": "internal_error", "detail": "see the bridge's log"})
    finally:
        if guarded is not None:
            guarded.request_finished()
    registration = fields.get("registration")
    if registration is not None and request.method == "POST":
        elapsed = time.perf_counter() - started
        metrics.requests(registration, response.status, outcome).inc()
        metrics.request_seconds(registration).observe(elapsed)
        level = log.info if response.status < 500 else log.warning
        level(
            "webhook_handled",
            status=response.status,
            outcome=outcome,
            duration_ms=round(elapsed * 1000, 2),
            **fields,
        )
    return response


class Receiver:
    """The webhook and challenge handlers of every registration."""

    def __init__(
        self,
        config: Config,
        verifier: Verifier,
        publisher: Publisher,
        outbox: Outbox | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        self.config = config
        self.outbox = outbox
        self.tracing = tracing
        self.intake = (
            Intake(config, verifier, publisher, outbox)
            if tracing is None
            else TracedIntake(tracing, config, verifier, publisher, outbox)
        )

    def add_routes(self, app: web.Application) -> None:
        for registration in self.config.registrations:
            # Traced only when tracing is on: off, the plain handler is all there is.
            handler = self.webhook if self.tracing is None else self.traced_webhook
            app.router.add_post(registration.path, partial(handler, name=registration.name))
            app.router.add_get(registration.path, partial(self.challenge, name=registration.name))

    def reload(self, config: Config) -> list[str]:
        """Adopt ``config``'s rules; returns what could not be applied without a restart."""
        notes: list[str] = []
        paths = {r.name: r.path for r in self.config.registrations}
        kept = [r for r in config.registrations if paths.get(r.name) == r.path]
        if len(kept) != len(config.registrations) or len(kept) != len(paths):
            notes.append("registrations added, removed or moved to another path: restart")
        merged = {r.name: r for r in self.config.registrations} | {r.name: r for r in kept}
        for name in (
            "server", "broker", "verification", "outbox", "dedup", "logging", "metrics", "journal",
        ):  # fmt: skip
            new, old = getattr(config, name), getattr(self.config, name)
            if name == "server":  # its certificate files are reloaded on SIGHUP (the daemon)
                new = replace(new, tls=old.tls)
            if new != old:
                notes.append(f"{name} settings changed: restart to apply them")
        self.intake.reload(config, [merged[n] for n in paths])
        return notes

    async def challenge(self, request: web.Request, name: str) -> web.Response:
        value = request.query.get("challenge")
        if value is None:
            raise BadRequest("no_challenge", "GET expects ?challenge=<value>")
        if not CHALLENGE.fullmatch(value):
            raise BadRequest("bad_challenge", "challenge must be 1-256 URL-safe characters")
        log.info("challenge_answered", registration=name, challenge=value)
        return json_response(200, {"challenge": value})

    async def traced_webhook(self, request: web.Request, name: str) -> web.Response:
        """:meth:`webhook` inside the request's span (``bridge.tracing``)."""
        assert self.tracing is not None
        handle = partial(self.webhook, request, name)
        return await self.tracing.webhook(request, name, handle, request[LOG_FIELDS])

    async def webhook(self, request: web.Request, name: str) -> web.Response:
        fields = request[LOG_FIELDS]
        fields["registration"] = name
        delivery_id = header_text(request.headers, "x-adobe-delivery-id", 128)
        if delivery_id is not None:
            fields["delivery_id"] = delivery_id
        try:
            # One timer for the whole request, the body's arrival included.
            async with asyncio.timeout(self.config.server.answer_deadline) as scope:
                request[DEADLINE] = scope.when() or 0.0
                pairs, limit = self._admit(request)
                body = await self._receive(request, limit)
                mark_busy(request)
                arrival = Arrival(
                    body,
                    request.headers,
                    name,
                    datetime.now(UTC),
                    request[DEADLINE],
                    pairs if self.config.verification.enabled else None,
                )
                outcome = await self.intake.take(arrival, fields)
        except TimeoutError:
            raise Unavailable("deadline", "could not finish within the answer deadline") from None
        if outcome.refusal is not None:
            raise outcome.refusal
        fields["outcome"] = outcome.status
        return json_response(200, outcome.answer())

    def _admit(self, request: web.Request) -> tuple[list[SignedPair], int]:
        """What can be refused before the body is read; the signature pairs, and how many body
        bytes to read at most."""
        if request.content_type not in JSON_TYPES and not request.content_type.endswith("+json"):
            raise UnsupportedMediaType(
                "unsupported_media_type",
                f"content type {request.content_type!r} is not JSON",
                close=True,
            )
        encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            # Adobe sends bodies as they are signed; a decoded body is not what was signed.
            raise UnsupportedMediaType(
                "unsupported_content_encoding",
                f"content encoding {encoding[:32]!r}: send the body as it was signed",
                close=True,
            )
        limit = self.config.server.max_body_bytes
        length = request.content_length
        if length is not None and length > limit:
            raise PayloadTooLarge("body_too_large", f"body over the {limit}-byte limit", close=True)
        if not self.config.verification.enabled:
            return [], limit
        pairs, problems = signed_pairs(request.headers)
        if pairs:
            return pairs, limit
        if not _unsigned(request.headers):
            raise Unauthenticated("signature_missing", "; ".join(problems), close=True)
        # No signature header at all: Adobe's validationUrl POST may come so, and is small.
        if length is None or length > VALIDATION_PEEK_BYTES:
            raise Unauthenticated(
                "signature_missing",
                "no signature headers (x-adobe-digital-signature-1…)",
                close=True,
            )
        return [], VALIDATION_PEEK_BYTES

    async def _receive(self, request: web.Request, limit: int) -> bytes:
        content = request.content
        chunks, size = [], 0
        try:
            async with asyncio.timeout(self.config.server.body_timeout):
                while chunk := await content.readany():  # usually one: it came with the headers
                    chunks.append(chunk)
                    size += len(chunk)
                    if size > limit:
                        raise PayloadTooLarge(
                            "body_too_large", f"body over the {limit}-byte limit", close=True
                        )
        except TimeoutError:
            # 503, not 408: Adobe retries only 429 and 5xx, and a slow link may be Adobe's.
            metrics.CONNECTIONS_CLOSED.labels("body_timeout").inc()
            raise Unavailable(
                "body_timeout", "the body did not arrive in time", close=True
            ) from None
        except (web.RequestPayloadError, ConnectionError) as exc:
            transport = request.transport
            if isinstance(exc, ConnectionError) or transport is None or transport.is_closing():
                raise ClientGone("client_gone", "the client closed the connection") from None
            raise BadRequest("bad_body", f"the body could not be read: {exc}", close=True) from None
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _unsigned(headers: Any) -> bool:
    return not any(headers.get(h) for h in (*SIGNATURE_HEADERS, *KEY_PATH_HEADERS))
