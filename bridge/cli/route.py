"""``events-bridge route``: a dry run. Parse an event file as the receiver would and print where
each event would go, and why. Nothing is published."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from bridge.cli.options import Subparsers, config_arg
from bridge.errors import BadRequest, ConfigError, PayloadTooLarge, UsageError

if TYPE_CHECKING:
    from bridge.adobe.envelope import Event
    from bridge.config import Registration


def add_route(sub: Subparsers) -> None:
    p = sub.add_parser(
        "route",
        help="dry run: where would this event go?",
        description="Parse an event file as the receiver would and print its "
        "envelope, id, code, job status and publish targets. "
        "Nothing is published.",
    )
    config_arg(p)
    p.add_argument("event", type=Path, metavar="EVENT.json")
    p.add_argument("--event-id", help="the x-adobe-event-id header, for bodies without an id")
    p.add_argument("--event-code", help="the x-adobe-event-code header, for bodies without a code")
    p.add_argument("--provider", help="the x-adobe-provider header, for rules that match on it")
    p.add_argument("--registration", help="use this registration's own routes, if it has any")
    p.set_defaults(run=run_route)


def _route_registration(args: argparse.Namespace) -> Registration | None:
    """The registration `route` speaks for: --registration, or the only one there is."""
    from bridge.config import load_config

    try:
        registrations = load_config(args.config, sections=("broker", "registrations")).registrations
    except ConfigError:
        if args.registration:
            raise
        return None  # e.g. BRIDGE_CLIENT_IDS unset: the shared routes, no recipient check
    if args.registration:
        found = [r for r in registrations if r.name == args.registration]
        if not found:
            raise UsageError(f"no registration named {args.registration!r} in {args.config}")
        return found[0]
    return registrations[0] if len(registrations) == 1 else None


def run_route(args: argparse.Namespace) -> int:
    """The road's own parse, authorize and route steps (``bridge.parse``, ``bridge.intake``),
    explained."""
    from datetime import UTC, datetime

    from bridge.config import load_config
    from bridge.intake import Intake
    from bridge.message import RequestContext
    from bridge.parse import parse
    from bridge.routing import Router

    config = load_config(args.config, sections=("server", "broker", "topology", "routes"))
    registration = _route_registration(args)
    routes = config.routes if registration is None else config.routes_for(registration)
    try:
        raw = args.event.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {args.event}: {exc.strerror}") from None
    headers = {
        name: value
        for name, value in (
            ("x-adobe-event-id", args.event_id),
            ("x-adobe-event-code", args.event_code),
            ("x-adobe-provider", args.provider),
        )
        if value is not None
    }
    try:
        delivery = parse(raw, headers, config.server.max_batch_events)
    except (BadRequest, PayloadTooLarge) as exc:
        print(f"{args.event}: would be refused with {exc.status}: {exc.detail}")
        return 1
    if delivery.validation_url is not None:
        print(f"{args.event}: a validationUrl handshake: logged, answered 200, never published")
        return 0
    name = registration.name if registration else ""
    context = RequestContext.from_headers(name, datetime.now(UTC), headers)
    router = Router(routes, config.broker.unrouted_exchange)
    plan = Intake.plan(delivery, registration, router, context, explain=True)
    kind = "batch of" if delivery.batch else "single delivery,"
    where = f"registration {registration.name}" if registration else "the shared routes"
    print(f"{args.event}: {kind} {len(delivery.events)} event(s), {len(routes)} rule(s) of {where}")
    for event, refused, decision in zip(
        delivery.events, plan.refusals, plan.decisions, strict=True
    ):
        _print_event(event)
        if refused is not None:
            print(f"    -> refused with 403 ({refused.reason}): {refused.detail}")
            continue
        for reason in decision.reasons:
            print(f"    {reason}")
        for target in decision.targets:
            extra = "".join(f", header {k}={v}" for k, v in target.headers)
            print(f"    -> exchange {target.exchange}, routing key {target.routing_key}{extra}")
        if decision.dropped:
            print(f"    -> dropped by rule {decision.dropped_by}: accepted, never published")
    return 0


def _print_event(event: Event) -> None:
    print(f"  event {event.event_id}")
    print(f"    envelope:   {event.envelope}")
    print(f"    event code: {event.event_code}")
    print(f"    job status: {event.job_status or '(none)'}  job id: {event.job_id or '(none)'}")
    print(f"    IMS org:    {event.ims_org or '(none)'}")
    print(f"    recipient:  {event.recipient or '(none: ' + str(event.recipient_problem) + ')'}")
