"""The aiohttp edge: receive a webhook and answer it; the road runs through here in order.

    receive (content type and encoding, size, the signature headers' shape, the body in time)
    → verify (signatures over the raw bytes) → parse (envelope; a bounded batch)
    → authorize (recipient, IMS org) → dedup → route → deliver (publish with confirms; else the
    outbox, or the quarantine for what no broker takes) → answer (200 only when all is safe)

Owns: the handlers for ``POST <path>`` (events, batches and the ``validationUrl`` handshake) and
``GET <path>?challenge=…``, and the one error middleware that maps :class:`Refusal` to HTTP (and
aiohttp's own 404 and 405 to the same JSON), writes the canonical log line and counts the
request. Each registration gets its own path.

Cost order, so that nobody without a signature can deny service to those with one: what is
cheap is refused first, before the body is read (content type and encoding, the size, the
signature headers' shape: a request that cannot verify takes nothing); the body must arrive
within ``server.body_timeout``; only then is the signature checked, and only a verified request
takes one of the ``server.max_in_flight`` slots (more get a 429) for the rest of the road. A body
over 1 MiB is parsed in a thread, one at a time, so a large batch never stalls the loop.

Every answer comes within ``server.answer_deadline`` (7.5 s; Adobe gives up at 10 s): whatever
runs out of time is a 503 (Adobe retries it). A client that goes away mid-request is logged as
``client_gone`` (counted as status 499, as nginx does), not as a failure of ours. Does not: know
AMQP, fetch keys, or parse JSON itself.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import Any, Final

import orjson
import structlog
from aiohttp import web
from yarl import URL

from bridge import metrics
from bridge.adobe.envelope import MAX_HEADER_FIELD, Delivery, parse_delivery
from bridge.adobe.signature import KEY_PATH_HEADERS, SIGNATURE_HEADERS, SignedPair, signed_pairs
from bridge.authorize import authorize
from bridge.config import Config, Registration
from bridge.connections import GuardedHandler, mark_busy
from bridge.dedup import RecentIds
from bridge.errors import (
    RETRYABLE,
    BadRequest,
    BrokerUnavailable,
    ClientGone,
    PayloadTooLarge,
    Refusal,
    TooManyRequests,
    Unauthenticated,
    Unavailable,
    UnsupportedMediaType,
)
from bridge.message import OMITTED, Outbound, RequestContext, build_message, header_text
from bridge.outbox import Outbox, OutboxUnavailable
from bridge.publisher import Publisher, unsafe_and_refused
from bridge.routing import Router
from bridge.verify import Verifier

log = structlog.get_logger("bridge.receiver")

# Per-request fields for the canonical log line; handlers add to it as they learn things.
LOG_FIELDS: Final = web.RequestKey("log_fields", dict)

JSON_TYPES: Final = frozenset(
    {"application/json", "application/cloudevents+json", "application/cloudevents-batch+json"}
)
# Adobe's challenge values are UUIDs; accept a little more, never markup or quotes.
CHALLENGE: Final = re.compile(r"^[A-Za-z0-9._~-]{1,256}$")
VALIDATION_PEEK_BYTES: Final = 4096
# Adobe's asynchronous validation URL: https://csm.adobe.io/csm/registrations/validate?id=…
VALIDATION_HOST: Final = "csm.adobe.io"
_URL_TEXT: Final = re.compile(r"^[A-Za-z0-9._~:/?#\[\]@!$&'()*+,;=%-]{1,2048}$")
PARSE_IN_THREAD_BYTES: Final = 1024 * 1024
OUTBOX_MARGIN: Final = 1.0  # seconds kept, of the answer deadline, for the outbox's fsync
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


@dataclass(frozen=True)
class Rules:
    """What a configuration reload may change, swapped in as one value: each registration's
    client ids, IMS orgs and compiled routes. A request uses the one it started with."""

    registrations: dict[str, Registration]
    routers: dict[str, Router]

    @classmethod
    def build(cls, config: Config) -> Rules:
        return cls(
            {r.name: r for r in config.registrations},
            {
                r.name: Router(config.routes_for(r), config.broker.unrouted_exchange)
                for r in config.registrations
            },
        )


class Receiver:
    """The webhook and challenge handlers of every registration."""

    def __init__(
        self,
        config: Config,
        verifier: Verifier,
        publisher: Publisher,
        outbox: Outbox | None = None,
    ) -> None:
        self.config = config
        self.verifier = verifier
        self.publisher = publisher
        self.outbox = outbox
        self.rules = Rules.build(config)
        self.in_flight = 0
        self._large_parses = asyncio.Semaphore(1)
        dedup = config.dedup
        self.recent = RecentIds(dedup.size, dedup.seconds) if dedup.enabled else None

    def add_routes(self, app: web.Application) -> None:
        for registration in self.config.registrations:
            app.router.add_post(registration.path, partial(self.webhook, name=registration.name))
            app.router.add_get(registration.path, partial(self.challenge, name=registration.name))

    def reload(self, config: Config) -> list[str]:
        """Adopt ``config``'s rules; returns what could not be applied without a restart."""
        notes: list[str] = []
        paths = {r.name: r.path for r in self.config.registrations}
        kept = [r for r in config.registrations if paths.get(r.name) == r.path]
        if len(kept) != len(config.registrations) or len(kept) != len(paths):
            notes.append("registrations added, removed or moved to another path: restart")
        merged = {r.name: r for r in self.config.registrations} | {r.name: r for r in kept}
        for name in ("server", "broker", "verification", "outbox", "dedup", "logging", "metrics"):
            if getattr(config, name) != getattr(self.config, name):
                notes.append(f"{name} settings changed: restart to apply them")
        # The broker settings (the unrouted exchange among them) stay those of the running
        # process: they change with a restart, as the note above says.
        self.rules = Rules.build(
            dataclasses.replace(
                config,
                broker=self.config.broker,
                registrations=tuple(merged[n] for n in paths),
            )
        )
        return notes

    async def challenge(self, request: web.Request, name: str) -> web.Response:
        value = request.query.get("challenge")
        if value is None:
            raise BadRequest("no_challenge", "GET expects ?challenge=<value>")
        if not CHALLENGE.fullmatch(value):
            raise BadRequest("bad_challenge", "challenge must be 1-256 URL-safe characters")
        log.info("challenge_answered", registration=name, challenge=value)
        return json_response(200, {"challenge": value})

    async def webhook(self, request: web.Request, name: str) -> web.Response:
        rules = self.rules
        registration, router = rules.registrations[name], rules.routers[name]
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
                return await self._process(
                    request, registration, router, body, pairs=pairs, fields=fields
                )
        except TimeoutError:
            raise Unavailable("deadline", "could not finish within the answer deadline") from None

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

    async def _process(
        self,
        request: web.Request,
        registration: Registration,
        router: Router,
        body: bytes,
        *,
        pairs: list[SignedPair],
        fields: dict[str, Any],
    ) -> web.Response:
        if self.config.verification.enabled:
            if not pairs:  # unsigned and small: only the validationUrl handshake is taken
                delivery = _try_validation(body)
                if delivery is None:
                    raise Unauthenticated(
                        "signature_missing", "no signature headers (x-adobe-digital-signature-1…)"
                    )
                return self._validation(registration, delivery, fields)
            await self.verifier.check_pairs(pairs, body)
        # Only verified requests get this far: the slots are for work worth doing.
        if self.in_flight >= self.config.server.max_in_flight:
            raise TooManyRequests("too_many_requests", "too many requests in flight")
        self.in_flight += 1
        try:
            return await self._handle(request, registration, router, body, fields)
        finally:
            self.in_flight -= 1

    async def _handle(
        self,
        request: web.Request,
        registration: Registration,
        router: Router,
        body: bytes,
        fields: dict[str, Any],
    ) -> web.Response:
        headers = request.headers
        delivery = await self._parse(body, headers)
        if delivery.validation_url is not None:
            return self._validation(registration, delivery, fields)
        _describe(delivery, fields)
        authorize(delivery, registration)
        context = RequestContext.from_headers(registration.name, datetime.now(UTC), headers)
        provider = context.copied.get("adobe-provider")
        fresh, fresh_keys = self._fresh(delivery, registration.name, fields)
        decisions = [(e, router.route(e, provider, registration.name)) for e in fresh]
        # Every event's first target, then the second ones: two copies of one event are never
        # in flight at once (bridge.publisher), so this way a batch waits one round trip a
        # layer of targets, not one an event.
        messages = [
            build_message(event, decision.targets[n], context, primary=n == 0)
            for n in range(max((len(d.targets) for _, d in decisions), default=0))
            for event, decision in decisions
            if n < len(decision.targets)
        ]
        for message in messages:
            if OMITTED in message.headers:
                for name in message.headers[OMITTED].split(","):
                    metrics.HEADERS_OMITTED.labels(name).inc()
        fields["routing_key"] = _one_or_list([m.routing_key for m in messages])
        delivered = await self._deliver(messages, request[DEADLINE]) if messages else None
        if self.recent is not None:
            for key in fresh_keys:
                self.recent.remember(key)
        for event, decision in decisions:
            if decision.dropped:
                metrics.EVENTS_DROPPED.labels(decision.dropped_by or "").inc()
                log.info(
                    "event_dropped",
                    event_id=event.event_id,
                    rule=decision.dropped_by,
                    registration=registration.name,
                )
        fields["outcome"] = delivered or ("duplicate" if not fresh else "dropped")
        return json_response(
            200,
            {
                "status": fields["outcome"],
                "events": len(delivery.events),
                "messages": len(messages),
            },
        )

    async def _parse(self, body: bytes, headers: Any) -> Delivery:
        args = (
            body,
            header_text(headers, "x-adobe-event-id", MAX_HEADER_FIELD),
            header_text(headers, "x-adobe-event-code", MAX_HEADER_FIELD),
            self.config.server.max_batch_events,
        )
        if len(body) <= PARSE_IN_THREAD_BYTES:
            return parse_delivery(*args)
        # A large body (signed: only Adobe's, or a replay of one) may take a second to parse:
        # in a thread, one at a time, so the loop goes on answering everyone else.
        async with self._large_parses:
            return await asyncio.to_thread(parse_delivery, *args)

    def _fresh(
        self, delivery: Delivery, registration: str, fields: dict[str, Any]
    ) -> tuple[list[Any], list[bytes]]:
        """The events not seen lately (per registration: the same event may legitimately reach
        two), each id once per request; and their dedup keys, remembered once they are safe."""
        recent, prefix = self.recent, f"{registration}\n"
        fresh, keys = [], []
        bodies: dict[str, bytes] = {}
        for event in delivery.events:
            if delivery.batch:
                if event.event_id in bodies:  # a batch naming one event twice: published once
                    if bodies[event.event_id] != event.body:
                        log.warning(
                            "event_id_repeated_in_batch",
                            event_id=event.event_id,
                            registration=registration,
                            detail="another body under the same id: the first is published",
                        )
                    continue
                bodies[event.event_id] = event.body
            if recent is not None:
                key = recent.key(prefix + event.event_id)
                if recent.seen(key):
                    continue
                keys.append(key)
            fresh.append(event)
        if len(fresh) < len(delivery.events):
            metrics.DUPLICATES.inc(len(delivery.events) - len(fresh))
            fields["duplicates"] = len(delivery.events) - len(fresh)
        return fresh, keys

    async def _deliver(self, messages: list[Outbound], deadline: float) -> str:
        """Make every message safe; the outcome: ``published`` (confirmed by the broker),
        ``stored`` (some or all fsync'ed in the outbox) or ``quarantined``.

        ``always``: the outbox first (write-ahead); ``fallback``: the outbox for what the broker
        did not confirm, the quarantine for what no broker takes; ``off`` (no outbox): a 503, or
        a 413 for a message no broker takes. The publish ends :data:`OUTBOX_MARGIN` before the
        request's ``deadline`` at the latest, so what it leaves unconfirmed still reaches the
        outbox in time.
        """
        outbox, mode = self.outbox, self.config.outbox.mode
        if outbox is not None and mode == "always":
            await outbox.append(messages)
            metrics.EVENTS_STORED.inc(sum(m.primary for m in messages))
            return "stored"
        try:
            await self.publisher.publish(messages, deadline - OUTBOX_MARGIN)
        except BrokerUnavailable as exc:
            unsafe, refused = unsafe_and_refused(exc, messages)
            left = {id(m) for m, _ in unsafe} | {id(m) for m, _ in refused}
            metrics.count_published(m for m in messages if id(m) not in left)
            if outbox is None or mode != "fallback":
                if refused and not unsafe:
                    raise PayloadTooLarge(
                        "unpublishable", f"no broker takes this event as it is: {refused[0][1]}"
                    ) from None
                raise
            if refused:
                try:
                    await outbox.quarantine([(m, "unpublishable", why) for m, why in refused])
                except OSError as error:
                    raise OutboxUnavailable(
                        "outbox_unavailable", f"quarantine write failed: {error}"
                    ) from None
            if not unsafe:
                return "quarantined"
            log.info("publish_failed_using_outbox", reason=exc.reason, messages=len(unsafe))
            await outbox.append([m for m, _ in unsafe], [d for _, d in unsafe])
            metrics.EVENTS_STORED.inc(sum(m.primary for m, _ in unsafe))
            return "stored"
        metrics.count_published(messages)
        return "published"

    def _validation(
        self, registration: Registration, delivery: Delivery, fields: dict[str, Any]
    ) -> web.Response:
        url = delivery.validation_url or ""
        if not _adobe_validation_url(url):
            # Anyone can POST this unsigned; only Adobe's own URL is worth an operator's click.
            raise BadRequest(
                "validation_url_not_adobe",
                f"validationUrl is not an https://{VALIDATION_HOST}/ URL",
            )
        metrics.VALIDATION_POSTS.labels(registration.name).inc()
        log.warning(
            "validation_url_received",
            registration=registration.name,
            validation_url=url,
            action="open this URL within 5 minutes to validate the registration",
        )
        fields["outcome"] = "validation_url_logged"
        return json_response(200, {"status": "validation_url_logged"})


def _adobe_validation_url(text: str) -> bool:
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


def _unsigned(headers: Any) -> bool:
    return not any(headers.get(h) for h in (*SIGNATURE_HEADERS, *KEY_PATH_HEADERS))


def _try_validation(body: bytes) -> Delivery | None:
    try:
        delivery = parse_delivery(body)
    except Refusal:
        return None
    return delivery if delivery.validation_url is not None else None


def _describe(delivery: Delivery, fields: dict[str, Any]) -> None:
    events = delivery.events
    fields["events"] = len(events)
    fields["event_id"] = _one_or_list([e.event_id for e in events])
    fields["event_code"] = _one_or_list([e.event_code for e in events])
    fields["job_status"] = _one_or_list([e.job_status or "none" for e in events])


def _one_or_list(values: list[str]) -> str | list[str]:
    return values[0] if len(values) == 1 else values
