"""The road, whatever brought the events: verify → parse → authorize → dedup → route → build →
deliver, and the :class:`Outcome` to answer with.

Owns: :class:`Intake`: one :class:`Arrival` (a body's bytes, its headers, registration, receive
time, signatures and deadline) in, an :class:`Outcome` out: what was done (published, stored,
quarantined, duplicate, dropped, the validation handshake) or the :class:`~bridge.errors.Refusal`,
with the facts for the log line. The webhook edge (``bridge.receiver``) only reads, limits and
answers around it; the journal (``bridge.journal``) hands parsed events to
:meth:`Intake.take_delivery`; ``events-bridge route`` asks :meth:`Intake.plan` without
delivering. The dedup memory and the rules of a reload are the intake's, shared by every source.

Delivery semantics (README): an event is safe once the broker confirmed it or the outbox fsync'ed
it (what no broker takes: the quarantine); only then is the outcome a success, and dedup
remembers it.

Does not: speak HTTP, know AMQP, fetch keys, or parse (``bridge.parse`` does).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

import structlog

from bridge import metrics
from bridge.adobe.envelope import Delivery, Event
from bridge.adobe.handshake import VALIDATION_HOST, adobe_validation_url, try_validation
from bridge.adobe.signature import SignedPair
from bridge.authorize import authorize, refusal
from bridge.config import Config, Registration
from bridge.dedup import RecentIds
from bridge.errors import (
    BadRequest,
    BrokerUnavailable,
    Forbidden,
    PayloadTooLarge,
    Refusal,
    TooManyRequests,
    Unauthenticated,
)
from bridge.message import OMITTED, Outbound, RequestContext, build_message
from bridge.outbox import Outbox, OutboxUnavailable
from bridge.parse import Parser
from bridge.publisher import Publisher, unsafe_and_refused
from bridge.routing import Decision, Router
from bridge.verify import Verifier

log = structlog.get_logger("bridge.intake")

OUTBOX_MARGIN: Final = 1.0  # seconds kept, of the answer deadline, for the outbox's fsync


@dataclass(frozen=True)
class Arrival:
    """One body to take, and what is known about it.

    ``signatures``: the signature pairs its headers carry, to verify over ``body`` (empty: it
    came unsigned, so only the validation handshake is taken); None when the source needs no
    signature (``verification.enabled: false``, or a source authenticated otherwise).
    ``deadline``: the loop time by which every event must be safe.
    """

    body: bytes
    headers: Mapping[str, str]
    registration: str
    received_at: datetime
    deadline: float
    signatures: Sequence[SignedPair] | None = None


@dataclass(frozen=True)
class Outcome:
    """What became of an arrival: ``status`` when every event is safe (``published``,
    ``stored``, ``quarantined``, ``duplicate``, ``dropped``, ``validation_url_logged``), else
    the ``refusal``; and the facts the log line reports."""

    status: str
    refusal: Refusal | None = None
    events: int = 0
    messages: int = 0
    facts: Mapping[str, Any] = field(default_factory=dict)

    def answer(self) -> dict[str, Any]:
        """The body of a success's answer."""
        if self.status == "validation_url_logged":
            return {"status": self.status}
        return {"status": self.status, "events": self.events, "messages": self.messages}


@dataclass(frozen=True)
class Plan:
    """What the road would do with a delivery's events: each event's refusal (None: it is the
    registration's) and routing decision, and the messages it would publish, in sending order."""

    delivery: Delivery
    refusals: list[Forbidden | None]
    decisions: list[Decision]
    messages: list[Outbound]


@dataclass(frozen=True)
class Rules:
    """What a configuration reload may change, swapped in as one value: each registration's
    client ids, IMS orgs and compiled routes. An arrival uses the one it started with."""

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


class Intake:
    """The road from an arrival's bytes to safe events; see the module docstring."""

    def __init__(
        self,
        config: Config,
        verifier: Verifier | None,
        publisher: Publisher | None,
        outbox: Outbox | None = None,
    ) -> None:
        self.config = config
        self.verifier = verifier
        self.publisher = publisher
        self.outbox = outbox
        self.rules = Rules.build(config)
        self.in_flight = 0
        self.parse = Parser(config.server.max_batch_events)
        dedup = config.dedup
        self.recent = RecentIds(dedup.size, dedup.seconds) if dedup.enabled else None

    async def take(self, arrival: Arrival, facts: dict[str, Any] | None = None) -> Outcome:
        """Walk ``arrival`` down the road. Refusals come back in the outcome; a bug raises.

        ``facts``: where the facts for the log line are written as they are learned (the
        outcome carries them too), so that they are there even when the caller's deadline or
        a bug ends the road half-way.
        """
        facts = {} if facts is None else facts
        try:
            return await self._take(arrival, facts)
        except Refusal as refused:
            return Outcome("refused", refused, facts=facts)

    async def _take(self, arrival: Arrival, facts: dict[str, Any]) -> Outcome:
        if arrival.signatures is not None:
            if not arrival.signatures:  # unsigned and small: only the validation handshake
                delivery = try_validation(arrival.body)
                if delivery is None:
                    raise Unauthenticated(
                        "signature_missing", "no signature headers (x-adobe-digital-signature-1…)"
                    )
                return self._validation(arrival.registration, delivery)
            await self._verify(arrival)
        # Only verified arrivals get this far: the slots are for work worth doing.
        if self.in_flight >= self.config.server.max_in_flight:
            raise TooManyRequests("too_many_requests", "too many requests in flight")
        self.in_flight += 1
        try:
            return await self._handle(arrival, facts)
        finally:
            self.in_flight -= 1

    async def _handle(self, arrival: Arrival, facts: dict[str, Any]) -> Outcome:
        rules = self.rules
        registration = rules.registrations[arrival.registration]
        delivery = await self.parse(arrival.body, arrival.headers)
        if delivery.validation_url is not None:
            return self._validation(registration.name, delivery)
        facts.update(describe(delivery))
        authorize(delivery, registration)
        context = RequestContext.from_headers(
            registration.name, arrival.received_at, arrival.headers
        )
        return await self._publish(delivery, context, arrival.deadline, facts, rules)

    async def take_delivery(
        self, delivery: Delivery, context: RequestContext, deadline: float
    ) -> Outcome:
        """Events its source parsed and authorized (the journal): dedup → route → deliver."""
        facts = describe(delivery)
        try:
            return await self._publish(delivery, context, deadline, facts)
        except Refusal as refused:
            return Outcome("refused", refused, facts=facts)

    async def _publish(
        self,
        delivery: Delivery,
        context: RequestContext,
        deadline: float,
        facts: dict[str, Any],
        rules: Rules | None = None,
    ) -> Outcome:
        rules = rules or self.rules
        registration = rules.registrations[context.registration]
        fresh, keys = self._fresh(delivery, registration.name, facts)
        plan = self._route(delivery, rules.routers[registration.name], context, fresh)
        facts["routing_key"] = _one_or_list([m.routing_key for m in plan.messages])
        status = await self._deliver(plan.messages, deadline) if plan.messages else None
        if self.recent is not None:
            for key in keys:
                self.recent.remember(key)
        _count_drops(fresh, plan.decisions, registration.name)
        return Outcome(
            status or ("duplicate" if not fresh else "dropped"),
            events=len(delivery.events),
            messages=len(plan.messages),
            facts=facts,
        )

    # The steps a traced intake (``bridge.tracing``) wraps in spans: verify, route, deliver.
    async def _verify(self, arrival: Arrival) -> None:
        assert self.verifier is not None
        assert arrival.signatures is not None
        await self.verifier.check_pairs(list(arrival.signatures), arrival.body)

    def _route(
        self, delivery: Delivery, router: Router, context: RequestContext, events: list[Event]
    ) -> Plan:
        return self.plan(delivery, None, router, context, events=events)

    @staticmethod
    def plan(
        delivery: Delivery,
        registration: Registration | None,
        router: Router,
        context: RequestContext,
        *,
        events: Sequence[Event] | None = None,
        explain: bool = False,
    ) -> Plan:
        """Route and build ``events`` (default: all of ``delivery``'s), and say for each event
        of the delivery whether ``registration`` may take it (None: not asked). Pure, but for
        the count of headers left out."""
        refusals = [
            None
            if registration is None
            else refusal(e, registration, f"batch element {i}: " if delivery.batch else "")
            for i, e in enumerate(delivery.events)
        ]
        chosen = delivery.events if events is None else events
        provider = context.copied.get("adobe-provider")
        decisions = [
            router.route(e, provider, context.registration, explain=explain) for e in chosen
        ]
        # Every event's first target, then the second ones: two copies of one event are never
        # in flight at once (bridge.publisher), so this way a batch waits one round trip a
        # layer of targets, not one an event.
        messages = [
            build_message(event, decision.targets[n], context, primary=n == 0)
            for n in range(max((len(d.targets) for d in decisions), default=0))
            for event, decision in zip(chosen, decisions, strict=True)
            if n < len(decision.targets)
        ]
        for message in messages:
            if OMITTED in message.headers:
                for name in message.headers[OMITTED].split(","):
                    metrics.HEADERS_OMITTED.labels(name).inc()
        return Plan(delivery, refusals, decisions, messages)

    def _fresh(
        self, delivery: Delivery, registration: str, facts: dict[str, Any]
    ) -> tuple[list[Event], list[bytes]]:
        """The events not seen lately (per registration: the same event may legitimately reach
        two), each id once per arrival; and their dedup keys, remembered once they are safe."""
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
            facts["duplicates"] = len(delivery.events) - len(fresh)
        return fresh, keys

    async def _deliver(self, messages: list[Outbound], deadline: float) -> str:
        """Make every message safe; the status: ``published`` (confirmed by the broker),
        ``stored`` (some or all fsync'ed in the outbox) or ``quarantined``.

        ``always``: the outbox first (write-ahead); ``fallback``: the outbox for what the broker
        did not confirm, the quarantine for what no broker takes; ``off`` (no outbox): a 503, or
        a 413 for a message no broker takes. The publish ends :data:`OUTBOX_MARGIN` before
        ``deadline`` at the latest, so what it leaves unconfirmed still reaches the outbox in
        time.
        """
        outbox, mode = self.outbox, self.config.outbox.mode
        if outbox is not None and mode == "always":
            await outbox.append(messages)
            metrics.EVENTS_STORED.inc(sum(m.primary for m in messages))
            return "stored"
        assert self.publisher is not None
        try:
            await self.publisher.publish(messages, deadline - OUTBOX_MARGIN)
        except BrokerUnavailable as exc:
            return await self._keep(messages, exc)
        metrics.count_published(messages)
        return "published"

    async def _keep(self, messages: list[Outbound], exc: BrokerUnavailable) -> str:
        """The publish of ``messages`` failed: keep what it left unsafe, or refuse."""
        outbox, mode = self.outbox, self.config.outbox.mode
        unsafe, refused = unsafe_and_refused(exc, messages)
        left = {id(m) for m, _ in unsafe} | {id(m) for m, _ in refused}
        metrics.count_published(m for m in messages if id(m) not in left)
        if outbox is None or mode != "fallback":
            if refused and not unsafe:
                raise PayloadTooLarge(
                    "unpublishable", f"no broker takes this event as it is: {refused[0][1]}"
                ) from None
            raise exc
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

    def _validation(self, registration: str, delivery: Delivery) -> Outcome:
        url = delivery.validation_url or ""
        if not adobe_validation_url(url):
            # Anyone can POST this unsigned; only Adobe's own URL is worth an operator's click.
            raise BadRequest(
                "validation_url_not_adobe",
                f"validationUrl is not an https://{VALIDATION_HOST}/ URL",
            )
        metrics.VALIDATION_POSTS.labels(registration).inc()
        log.warning(
            "validation_url_received",
            registration=registration,
            validation_url=url,
            action="open this URL within 5 minutes to validate the registration",
        )
        return Outcome("validation_url_logged")

    def reload(self, config: Config, registrations: Sequence[Registration]) -> None:
        """Adopt ``config``'s routes for ``registrations``. The broker settings (the unrouted
        exchange among them) stay those of the running process: they change with a restart."""
        config = dataclasses.replace(config, broker=self.config.broker)
        self.rules = Rules.build(dataclasses.replace(config, registrations=tuple(registrations)))


def describe(delivery: Delivery) -> dict[str, Any]:
    """The facts of a delivery's events, for the log line."""
    events = delivery.events
    return {
        "events": len(events),
        "event_id": _one_or_list([e.event_id for e in events]),
        "event_code": _one_or_list([e.event_code for e in events]),
        "job_status": _one_or_list([e.job_status or "none" for e in events]),
    }


def _count_drops(events: Sequence[Event], decisions: Sequence[Decision], registration: str) -> None:
    for event, decision in zip(events, decisions, strict=True):
        if decision.dropped:
            metrics.EVENTS_DROPPED.labels(decision.dropped_by or "").inc()
            rule = decision.dropped_by
            log.info("event_dropped", event_id=event.event_id, rule=rule, registration=registration)


def _one_or_list(values: list[str]) -> str | list[str]:
    return values[0] if len(values) == 1 else values
