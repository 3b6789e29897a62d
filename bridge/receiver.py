"""The aiohttp edge: receive a webhook and answer it; the road runs through here in order.

    receive (content type, size, body in time) → verify (signatures over the raw bytes)
    → parse (envelope) → authorize (recipient, IMS org) → route → deliver (publish, confirms)
    → answer (200 only when every event is confirmed)

Owns: the handlers for ``POST <path>`` (events, batches and the ``validationUrl`` handshake) and
``GET <path>?challenge=…``, and the one error middleware that maps :class:`Refusal` to HTTP,
writes the canonical log line and counts the request. Each registration gets its own path.

Every answer comes within ``server.answer_deadline`` (7.5 s; Adobe gives up at 10 s): whatever
runs out of time, the body's arrival included, is a 503 (Adobe retries it). More than
``server.max_in_flight`` requests at once get a 429. Does not: know AMQP, fetch keys, or parse
JSON itself.
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
from bridge.adobe.envelope import MAX_FIELD_BYTES, Delivery, parse_delivery
from bridge.adobe.signature import KEY_PATH_HEADERS, SIGNATURE_HEADERS
from bridge.config import Config, Registration
from bridge.dedup import RecentIds
from bridge.errors import (
    RETRYABLE,
    BadRequest,
    BrokerUnavailable,
    Forbidden,
    PayloadTooLarge,
    Refusal,
    TooManyRequests,
    Unavailable,
    UnsupportedMediaType,
)
from bridge.message import Outbound, RequestContext, build_message, header_text
from bridge.outbox import Outbox
from bridge.publisher import Publisher
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
    except web.HTTPException:  # the router's 404/405: aiohttp answers them itself
        raise
    except Exception:  # the last resort: log the bug with its traceback, answer 500, keep serving
        log.exception("request_crashed", method=request.method, path=request.path)
        outcome = "crashed"
        response = json_response(500, {"error": "internal_error", "detail": "see the bridge's log"})
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
        for name in ("server", "broker", "verification", "outbox", "dedup", "logging"):
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
        headers = request.headers
        delivery_id = header_text(headers, "x-adobe-delivery-id", 128)
        if delivery_id is not None:
            fields["delivery_id"] = delivery_id
        if self.in_flight >= self.config.server.max_in_flight:
            raise TooManyRequests("too_many_requests", "too many requests in flight")
        self.in_flight += 1
        receiving = True
        try:
            # One timer for the whole request, the body's arrival included.
            async with asyncio.timeout(self.config.server.answer_deadline):
                body = await self._receive(request)
                receiving = False
                return await self._process(request, registration, router, body, fields)
        except TimeoutError:
            if receiving:
                # 503, not 408: Adobe retries only 429 and 5xx, and a slow link may be Adobe's.
                raise Unavailable("body_timeout", "the body did not arrive in time") from None
            raise Unavailable("deadline", "could not finish within the answer deadline") from None
        finally:
            self.in_flight -= 1

    async def _receive(self, request: web.Request) -> bytes:
        if request.content_type not in JSON_TYPES and not request.content_type.endswith("+json"):
            raise UnsupportedMediaType(
                "unsupported_media_type", f"content type {request.content_type!r} is not JSON"
            )
        limit = self.config.server.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            raise PayloadTooLarge("body_too_large", f"body over the {limit}-byte limit")
        content = request.content
        chunks, size = [], 0
        while chunk := await content.readany():  # usually one: the body came with the headers
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge("body_too_large", f"body over the {limit}-byte limit")
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def _process(
        self,
        request: web.Request,
        registration: Registration,
        router: Router,
        body: bytes,
        fields: dict[str, Any],
    ) -> web.Response:
        headers = request.headers
        if self.config.verification.enabled:
            if _unsigned(headers) and len(body) <= VALIDATION_PEEK_BYTES:
                # Adobe's validationUrl POST may come unsigned; it is only logged, never published.
                delivery = _try_validation(body)
                if delivery is not None:
                    return self._validation(registration, delivery, fields)
            await self.verifier.check(headers, body)
        delivery = parse_delivery(
            body,
            header_text(headers, "x-adobe-event-id", MAX_FIELD_BYTES),
            header_text(headers, "x-adobe-event-code", MAX_FIELD_BYTES),
        )
        if delivery.validation_url is not None:
            return self._validation(registration, delivery, fields)
        _describe(delivery, fields)
        _authorize(delivery, registration)
        context = RequestContext.from_headers(registration.name, datetime.now(UTC), headers)
        provider = context.copied.get("adobe-provider")
        # Per registration: the same event may legitimately reach two registrations.
        recent, prefix = self.recent, f"{registration.name}\n"
        fresh_keys: list[bytes] = []  # each digest made once: asked now, remembered once safe
        if recent is None:
            fresh = list(delivery.events)
        else:
            fresh = []
            for event in delivery.events:
                key = recent.key(prefix + event.event_id)
                if not recent.seen(key):
                    fresh.append(event)
                    fresh_keys.append(key)
        if len(fresh) < len(delivery.events):
            metrics.DUPLICATES.inc(len(delivery.events) - len(fresh))
            fields["duplicates"] = len(delivery.events) - len(fresh)
        decisions = [(e, router.route(e, provider, registration.name)) for e in fresh]
        messages = [
            build_message(event, target, context)
            for event, decision in decisions
            for target in decision.targets
        ]
        fields["routing_key"] = _one_or_list([m.routing_key for m in messages])
        stored = await self._deliver(messages) if messages else False
        if recent is not None:
            for key in fresh_keys:
                recent.remember(key)
        published: dict[tuple[str, str], int] = {}  # one metric update per kind, not per event
        for event, decision in decisions:
            if decision.dropped:
                metrics.EVENTS_DROPPED.labels(decision.dropped_by or "").inc()
                log.info(
                    "event_dropped",
                    event_id=event.event_id,
                    rule=decision.dropped_by,
                    registration=registration.name,
                )
            else:
                kind = (event.event_code, event.job_status or "none")
                published[kind] = published.get(kind, 0) + 1
        for (code, status), count in published.items():
            metrics.events_published(code, status).inc(count)
        fields["outcome"] = (
            "stored"
            if stored
            else "published"
            if messages
            else "duplicate"
            if not fresh
            else "dropped"
        )
        return json_response(
            200,
            {
                "status": fields["outcome"],
                "events": len(delivery.events),
                "messages": len(messages),
            },
        )

    async def _deliver(self, messages: list[Outbound]) -> bool:
        """Make every message safe: confirmed by the broker, or fsync'ed in the outbox.

        Returns True when they went to the outbox. ``always``: the outbox first (write-ahead);
        ``fallback``: the outbox when the broker cannot take them; ``off`` (no outbox): a 503.
        """
        outbox, mode = self.outbox, self.config.outbox.mode
        if outbox is not None and mode == "always":
            await outbox.append(messages)
            return True
        try:
            await self.publisher.publish(messages)
        except BrokerUnavailable as exc:
            if outbox is None or mode != "fallback":
                raise
            log.info("publish_failed_using_outbox", reason=exc.reason, messages=len(messages))
            await outbox.append(messages)
            return True
        return False

    def _validation(
        self, registration: Registration, delivery: Delivery, fields: dict[str, Any]
    ) -> web.Response:
        url = URL(delivery.validation_url or "")
        host = url.host or ""
        if url.scheme != "https" or not (host == "adobe.io" or host.endswith(".adobe.io")):
            # Anyone can POST this unsigned; only Adobe's own host is worth an operator's click.
            raise BadRequest(
                "validation_url_not_adobe", "validationUrl is not an https adobe.io URL"
            )
        metrics.VALIDATION_POSTS.labels(registration.name).inc()
        log.warning(
            "validation_url_received",
            registration=registration.name,
            validation_url=delivery.validation_url,
            action="open this URL within 5 minutes to validate the registration",
        )
        fields["outcome"] = "validation_url_logged"
        return json_response(200, {"status": "validation_url_logged"})


def _unsigned(headers: Any) -> bool:
    return not any(headers.get(h) for h in (*SIGNATURE_HEADERS, *KEY_PATH_HEADERS))


def _try_validation(body: bytes) -> Delivery | None:
    try:
        delivery = parse_delivery(body)
    except Refusal:
        return None
    return delivery if delivery.validation_url is not None else None


def _authorize(delivery: Delivery, registration: Registration) -> None:
    """Every event must name one of our client ids (and, if configured, one of our orgs)."""
    for i, event in enumerate(delivery.events):
        where = f"batch element {i}: " if delivery.batch else ""
        if not any(r in registration.client_ids for r in event.recipients):
            raise Forbidden(
                "recipient_mismatch",
                f"{where}recipient client id is not configured for this registration",
            )
        if registration.ims_orgs and event.ims_org not in registration.ims_orgs:
            raise Forbidden(
                "org_mismatch", f"{where}IMS org is not configured for this registration"
            )


def _describe(delivery: Delivery, fields: dict[str, Any]) -> None:
    events = delivery.events
    fields["events"] = len(events)
    fields["event_id"] = _one_or_list([e.event_id for e in events])
    fields["event_code"] = _one_or_list([e.event_code for e in events])
    fields["job_status"] = _one_or_list([e.job_status or "none" for e in events])


def _one_or_list(values: list[str]) -> str | list[str]:
    return values[0] if len(values) == 1 else values
