"""``events-bridge simulate``: act as Adobe I/O Events, a challenge then signed deliveries, with
Adobe's headers and, on request, its retry schedule (:mod:`bridge.simulate`)."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from bridge.cli.options import Subparsers
from bridge.errors import UsageError


def add_simulate(sub: Subparsers) -> None:
    p = sub.add_parser(
        "simulate",
        help="act as Adobe I/O Events: challenge, then signed deliveries",
        description="Send the challenge GET, then POST each event signed with RSA-SHA256 as "
        "Adobe signs it, with Adobe's headers. Exit 0 when every delivery got a 2xx.",
    )
    _delivery_args(p)
    _retry_args(p)
    p.add_argument(
        "--concurrency",
        type=int,
        default=1,
        metavar="N",
        help="deliveries in flight at once (default 1)",
    )
    p.add_argument("--no-challenge", action="store_true", help="skip the challenge GET")
    p.add_argument("--quiet", "-q", action="store_true", help="print only the summary")
    p.set_defaults(run=run_simulate)


def _delivery_args(p: argparse.ArgumentParser) -> None:
    """What is sent, where, and signed with which keys."""
    p.add_argument(
        "files",
        nargs="+",
        type=Path,
        metavar="FILE",
        help="event JSON files (a file holding an array gives one event per element)",
    )
    p.add_argument(
        "--url", required=True, help="the webhook URL, e.g. http://127.0.0.1:8080/webhook"
    )
    p.add_argument(
        "--key",
        action="append",
        required=True,
        type=Path,
        metavar="PRIVATE.pem",
        help="private key to sign with (give twice for two different keys)",
    )
    p.add_argument(
        "--key-path",
        action="append",
        required=True,
        metavar="/prod/keys/pub-key-NAME.pem",
        help="public key path sent in x-adobe-public-keyN-path (give twice for two)",
    )
    p.add_argument(
        "--client-id", help="set recipientclientid/recipient_client_id in each event, as Adobe does"
    )
    p.add_argument(
        "--batch",
        type=int,
        default=0,
        metavar="N",
        help="send events as batch deliveries (JSON arrays) of up to N",
    )
    p.add_argument(
        "--provider", default="events-bridge-simulator", help="x-adobe-provider header value"
    )


def _retry_args(p: argparse.ArgumentParser) -> None:
    """Adobe's retries, and how fast they run."""
    p.add_argument(
        "--retry",
        action="store_true",
        help="retry 429/5xx and timeouts on Adobe's schedule (1, 2, 4, 8, 15… min)",
    )
    p.add_argument(
        "--time-scale",
        type=float,
        default=1.0,
        metavar="F",
        help="multiply retry delays by F (e.g. 0.001 for tests)",
    )
    p.add_argument(
        "--max-attempts",
        type=int,
        default=0,
        metavar="N",
        help="stop retrying after N attempts (default: Adobe's 24 h)",
    )


def run_simulate(args: argparse.Namespace) -> int:
    from bridge.simulate import Simulator, build_deliveries, load_events, load_private_key

    if len(args.key) > 2 or len(args.key_path) > 2:
        raise UsageError("give --key and --key-path at most twice each")
    if args.batch < 0 or args.concurrency < 1 or args.time_scale < 0:
        raise UsageError("--batch, --concurrency and --time-scale must not be negative")
    simulator = Simulator(
        url=args.url,
        keys=[load_private_key(p) for p in args.key],
        key_paths=args.key_path,
        provider=args.provider,
        retry=args.retry,
        time_scale=args.time_scale,
        max_attempts=args.max_attempts,
        concurrency=args.concurrency,
        quiet=args.quiet,
    )
    deliveries = build_deliveries(load_events(args.files), args.batch, args.client_id)
    asyncio.run(simulator.run(deliveries, challenge=not args.no_challenge))
    accepted = sum(d.accepted for d in deliveries)
    events = sum(d.events for d in deliveries if d.accepted)
    print(f"simulate: {accepted}/{len(deliveries)} deliveries accepted ({events} events)")
    return 0 if accepted == len(deliveries) else 1
