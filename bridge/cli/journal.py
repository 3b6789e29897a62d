"""``events-bridge journal``: read Adobe's journal of the registration once, outside ``serve``:
a backfill after an outage, a look at what Adobe kept (``--dry-run``), or, run by a timer with
``--until-end``, a bridge that only pulls."""

from __future__ import annotations

import argparse
import re
import sys
from typing import TYPE_CHECKING

from bridge.cli.options import Subparsers, config_arg
from bridge.errors import UsageError

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from bridge.adobe.journal import Page
    from bridge.config import Config
    from bridge.journal import Progress, Taker
    from bridge.journal_intake import JournalIntake

DESCRIPTION = """\
Read the journal Adobe keeps of the registration's events (7 days) and publish each
event as the webhook would have been: the same routes, the same checks, the same
messages. Stops at Ctrl-C or SIGTERM after the page in hand, or at the end of the
journal with --until-end.

Where it starts:
  (no option)      where the last run stopped: the kept position in journal.state_dir
                   (BRIDGE_JOURNAL_STATE_DIR), shared with `serve` (which must not be
                   pulling at the same time); --dry-run reads it, never writes it;
                   with none kept, journal.start (BRIDGE_JOURNAL_START, default latest)
  --since POS      after this position (a position printed by an earlier run)
  --seek -PT2H     the events of the last 2 hours (any -PnDTnHnMnS within 7 days)
  --oldest         the oldest event Adobe still keeps
  --latest         only what arrives from now on
With --since, --seek, --oldest or --latest the kept position is neither read nor
written: a backfill does not move `serve`'s place in the journal.

Deduplication: this run remembers only its own events. Consumers that may get an
event twice (from `serve` and from here) deduplicate on message_id, as always.
"""

EPILOG = """\
examples:
  events-bridge journal --seek -PT6H --until-end --dry-run   # what would be published
  events-bridge journal --seek -PT6H --until-end             # publish the last 6 hours
  events-bridge journal --oldest --until-end                 # everything Adobe keeps

Needs journal.url and the IMS credential: BRIDGE_JOURNAL_URL, BRIDGE_IMS_CLIENT_ID,
BRIDGE_IMS_CLIENT_SECRET, BRIDGE_IMS_ORG_ID; and, when the defaults do not do,
BRIDGE_IMS_TOKEN_URL, BRIDGE_IMS_SCOPES, BRIDGE_JOURNAL_STATE_DIR, BRIDGE_JOURNAL_START,
BRIDGE_JOURNAL_PROXY (an http:// egress proxy; README.md, "The journal").
"""


def add_journal(sub: Subparsers) -> None:
    p = sub.add_parser(
        "journal",
        help="read Adobe's journal once: backfill or catch up",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    config_arg(p)
    # `--seek -PT2H`: argparse takes a word that starts with "-" for an option unless it looks
    # like a negative number (its own pattern, typed in typeshed); a negative duration is one
    # here too, or only `--seek=-PT2H` would do.
    p._negative_number_matcher = re.compile(  # noqa: SLF001
        r"^-\d+$|^-\d*\.\d+$|^-P[\dTDHMS.,]*$", re.IGNORECASE
    )
    start = p.add_mutually_exclusive_group()
    start.add_argument("--since", metavar="POSITION", help="start after this position")
    start.add_argument("--seek", metavar="-PT2H", type=_seek, help="start this long ago")
    start.add_argument("--oldest", action="store_true", help="start at the oldest event kept")
    start.add_argument("--latest", action="store_true", help="start at the end: new events only")
    p.add_argument(
        "--until-end", action="store_true", help="stop at the end of the journal (else: follow it)"
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print each event and where it would be published; publish nothing, keep nothing",
    )
    p.add_argument(
        "--limit", type=_limit, metavar="N", help="events a page (default: journal.limit)"
    )
    p.set_defaults(run=run_journal)


def _seek(text: str) -> str:
    from bridge.adobe.journal import seek_duration

    if seek_duration(text) is None:
        raise argparse.ArgumentTypeError(
            f"expected a negative ISO-8601 duration within 7 days, like -PT2H or -P1DT30M: {text!r}"
        )
    return text.strip()


def _limit(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 10_000:
        raise argparse.ArgumentTypeError("expected a whole number from 1 to 10000")
    return int(text)


def run_journal(args: argparse.Namespace) -> int:
    import dataclasses

    from bridge.config import load_config

    config = load_config(args.config)
    if not config.journal.enabled:
        raise UsageError(
            f"no journal to read: set BRIDGE_JOURNAL_URL (journal.url in {args.config}) "
            "to the registration's journal URL from Adobe's Developer Console"
        )
    if args.limit:
        journal = dataclasses.replace(config.journal, limit=args.limit)
        config = dataclasses.replace(config, journal=journal)
    from bridge import logs
    from bridge.cli.daemon import run

    logs.configure(config.logging.format, "warning")
    return run(_journal(config, args))


def _start(args: argparse.Namespace) -> str | None:
    """The start point the options name (None: the kept position)."""
    if args.seek:
        return str(args.seek)
    if args.oldest:
        return "oldest"
    if args.latest:
        return "latest"
    return None


async def _journal(config: Config, args: argparse.Namespace) -> int:
    import asyncio
    import signal
    from pathlib import Path

    from bridge.checkpoint import Checkpoint, StateUnavailable
    from bridge.journal import FATAL, JournalFailed, JournalReader, first_url

    start = _start(args)
    explicit = start is not None or args.since is not None
    checkpoint = None
    since = args.since
    if not explicit:  # the kept position; a dry run reads it (without the lock), never writes
        kept = Checkpoint(Path(config.journal.state_dir), config.journal.url)
        try:
            if not args.dry_run:
                kept.open()
                checkpoint = kept
            since = kept.load()
        except StateUnavailable as exc:
            kept.close()
            raise UsageError(str(exc)) from None
    url = first_url(config.journal, since, start or config.journal.start)
    take, close = await _taker(config, args.dry_run)
    line = ProgressLine(sys.stderr)
    reader = JournalReader(
        config.journal,
        url,
        take,
        checkpoint,
        until_end=args.until_end,
        fatal=FATAL,
        on_progress=line.show,
    )
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, reader.stop)
    try:
        progress = await reader.run()
    except JournalFailed as exc:
        done = reader.progress
        where = ""
        if done.position and checkpoint is None and not args.dry_run:
            where = f" after {done.events} events (resume with --since {done.position})"
        raise UsageError(f"journal: {exc}{where}") from None
    finally:
        line.done()
        await close()
        if checkpoint is not None:
            checkpoint.close()
    _summary(progress, args.dry_run, kept=checkpoint is not None)
    return 0


async def _taker(config: Config, dry_run: bool) -> tuple[Taker, Callable[[], Awaitable[None]]]:
    """What takes each page: a printer (``--dry-run``), or the road with a broker connection
    (no outbox: a page the broker does not confirm is read again, from the journal)."""
    from bridge.intake import Intake
    from bridge.journal_intake import JournalIntake

    registration = config.journal_registration().name
    if dry_run:
        intake = Intake(config, None, None)
        return DryRun(JournalIntake(intake, registration, 0.0)), _nothing
    import dataclasses

    from bridge.publisher import AmqpPublisher

    config = dataclasses.replace(config, outbox=dataclasses.replace(config.outbox, mode="off"))
    publisher = AmqpPublisher(config.broker, config.topology, "events-bridge-journal")
    await publisher.start()
    if not await publisher.wait_ready(config.broker.connect_timeout * 3):
        await publisher.close()
        raise UsageError(f"cannot reach the broker: {publisher.problem or 'no answer'}")
    intake = Intake(config, None, publisher)
    return JournalIntake(intake, registration, config.server.answer_deadline), publisher.close


async def _nothing() -> None:
    return None


class DryRun:
    """``--dry-run``: each event of a page, and where it would be published."""

    def __init__(self, journal: JournalIntake) -> None:
        self.journal = journal

    async def __call__(self, page: Page) -> bool:
        from datetime import UTC, datetime

        from bridge.adobe.envelope import Delivery
        from bridge.message import RequestContext

        intake = self.journal.intake
        name = self.journal.registration
        events = self.journal.events(page)
        context = RequestContext(name, datetime.now(UTC))
        plan = intake.plan(Delivery(tuple(events), True), None, intake.rules.routers[name], context)
        targets: dict[str, list[str]] = {}
        for message in plan.messages:
            targets.setdefault(message.message_id, []).append(
                f"{message.exchange} {message.routing_key}"
            )
        for event in events:
            where = "; ".join(targets.get(event.event_id, [])) or "dropped by a rule"
            print(f"{event.event_id}  {event.event_code}  -> {where}", flush=True)
        return True


class ProgressLine:
    """One line on a terminal, rewritten after each page: events, pages, rate, position."""

    def __init__(self, stream: object) -> None:
        self.stream = stream
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self.shown = False

    def show(self, progress: Progress) -> None:
        if not self.tty:
            return
        position = progress.position or "-"
        if len(position) > 48:
            position = position[:22] + "…" + position[-22:]
        text = (
            f"\rjournal: {progress.events:,} events, {progress.pages:,} pages, "
            f"{progress.rate:,.0f} events/s, position {position}"
        )
        self.stream.write(text + "\x1b[K")  # type: ignore[attr-defined]
        self.stream.flush()  # type: ignore[attr-defined]
        self.shown = True

    def done(self) -> None:
        if self.shown:
            self.stream.write("\n")  # type: ignore[attr-defined]


def _summary(progress: Progress, dry_run: bool, kept: bool) -> None:
    verb = "read (dry run: nothing published)" if dry_run else "taken"
    print(
        f"journal: {progress.events} events in {progress.pages} pages {verb}; "
        f"position {progress.position or '(none yet)'}",
        file=sys.stderr,
    )
    if progress.position and not kept and not dry_run:  # after a dry run: nothing to resume
        print(f"  resume with: events-bridge journal --since {progress.position}", file=sys.stderr)
