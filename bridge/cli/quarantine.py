"""``events-bridge quarantine``: list the events the outbox folders keep in quarantine (what no
broker takes as it is), and on request write their bodies out. Nothing is changed."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bridge.cli.options import Subparsers, config_arg
from bridge.errors import UsageError

if TYPE_CHECKING:
    from bridge.message import Outbound


def add_quarantine(sub: Subparsers) -> None:
    p = sub.add_parser(
        "quarantine",
        help="list the events the broker refused for what they are",
        description="Print each event kept in the outbox folders' quarantine.log (what no "
        "broker would take as it is, for example a body over the broker's max_message_size): "
        "when, message id, exchange, routing key, size and why. Nothing is changed; "
        "--bodies writes each body to a folder, to publish by other means.",
    )
    config_arg(p)
    p.add_argument("--bodies", type=Path, metavar="DIR", help="write each body to DIR/<n>.json")
    p.add_argument("--json", action="store_true", help="one JSON object per event")
    p.set_defaults(run=run_quarantine)


def run_quarantine(args: argparse.Namespace) -> int:
    from bridge.config import load_config
    from bridge.spool import read_quarantine

    config = load_config(args.config, sections=("outbox",))
    base = Path(config.outbox.dir)
    folders = [base, *sorted(p for p in base.glob("worker-*") if p.is_dir())]
    found = [(folder, *entry) for folder in folders for entry in read_quarantine(folder)]
    if args.bodies is not None:
        try:
            args.bodies.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"cannot write to {args.bodies}: {exc.strerror}") from None
    for n, (folder, message, meta) in enumerate(found, 1):
        if args.bodies is not None:
            (args.bodies / f"{n}.json").write_bytes(message.body)
        print(_describe(n, folder, message, meta, as_json=args.json))
    if not args.json:
        print(f"{len(found)} event(s) in quarantine under {base}")
    return 0


def _describe(n: int, folder: Path, message: Outbound, meta: dict[str, Any], as_json: bool) -> str:
    """One quarantined event: a JSON object, or a numbered line."""
    when, why = meta.get("quarantined_at", "?"), meta.get("quarantine_reason", "?")
    if as_json:
        return json.dumps(
            {
                "folder": str(folder),
                "quarantined_at": when,
                "message_id": message.message_id,
                "exchange": message.exchange,
                "routing_key": message.routing_key,
                "headers": message.headers,
                "body_bytes": len(message.body),
                "reason": why,
            }
        )
    return (
        f"{n}. {when} {message.message_id} -> {message.exchange} "
        f"{message.routing_key} ({len(message.body)} bytes): {why}"
    )
