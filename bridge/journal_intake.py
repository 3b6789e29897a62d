"""A journal page into the road: each event parsed as a webhook's body is, checked against the
registration (``bridge.authorize``, with the journal's rule for the recipient), then dedup →
route → deliver through the webhooks' own :class:`~bridge.intake.Intake`, so that an event that
comes both ways is published once within the dedup window.

An event the registration may not take (another client id, an IMS org not listed) or that is
not an event at all is skipped with a warning and counted (``bridge_journal_errors_total``):
unlike a webhook, a journal cannot be answered 403, and retrying would not change it. A page
is safe when every event it keeps is: published, stored in the outbox, or a duplicate.

Owns: that step. Does not: fetch pages (``bridge.journal``) or keep positions.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import structlog

from bridge import metrics
from bridge.adobe.envelope import Delivery, Event, parse_delivery
from bridge.adobe.journal import Entry, Page
from bridge.authorize import refusal
from bridge.errors import BadRequest, PayloadTooLarge
from bridge.intake import Intake
from bridge.message import RequestContext

log = structlog.get_logger("bridge.journal")


class JournalIntake:
    """Takes the pages of the journal of registration ``registration``."""

    def __init__(self, intake: Intake, registration: str, deadline_seconds: float) -> None:
        self.intake, self.registration = intake, registration
        self.deadline_seconds = deadline_seconds

    def events(self, page: Page) -> list[Event]:
        """The page's events that this registration takes, in order."""
        registration = self.intake.rules.registrations[self.registration]
        kept = []
        for entry in page.entries:
            event = _event(entry)
            if event is None:
                continue
            problem = refusal(event, registration, recipient_required=False)
            if problem is not None:
                metrics.JOURNAL_ERRORS.labels("refused").inc()
                log.warning(
                    "journal_event_refused",
                    event_id=event.event_id,
                    position=entry.position,
                    reason=problem.reason,
                    detail=problem.detail,
                    registration=registration.name,
                )
                continue
            kept.append(event)
        return kept

    async def __call__(self, page: Page) -> bool:
        """Make the page's events safe; False when they are not (the page is read again)."""
        events = self.events(page)
        if not events:
            return True
        context = RequestContext(self.registration, datetime.now(UTC))
        deadline = asyncio.get_running_loop().time() + self.deadline_seconds
        outcome = await self.intake.take_delivery(Delivery(tuple(events), True), context, deadline)
        if outcome.refusal is not None and outcome.refusal.reason == "unpublishable":
            # Every other message is confirmed; this one no broker takes as it is (too large
            # for max_message_size), and reading the page again would not change that. With an
            # outbox it would be in the quarantine; without one it is reported here, and skipped.
            metrics.JOURNAL_ERRORS.labels("unpublishable").inc()
            log.error(
                "journal_event_unpublishable",
                detail=outcome.refusal.detail,
                event_id=outcome.facts.get("event_id"),
                position=page.last,
                action="skipped; turn the outbox on to keep such events in the quarantine",
            )
            return True
        if outcome.refusal is not None:
            metrics.JOURNAL_ERRORS.labels("deliver").inc()
            log.warning(
                "journal_page_not_safe",
                reason=outcome.refusal.reason,
                detail=outcome.refusal.detail,
                events=len(events),
                action="the page is read again after a pause",
            )
            return False
        log.info(
            "journal_page_taken",
            outcome=outcome.status,
            events=len(events),
            messages=outcome.messages,
            duplicates=outcome.facts.get("duplicates", 0),
            position=page.last,
        )
        return True


def _event(entry: Entry) -> Event | None:
    """The entry's event, or None (logged, counted) when it is not one."""
    try:
        delivery = parse_delivery(entry.body, max_events=1)
    except (BadRequest, PayloadTooLarge) as exc:
        delivery, detail = None, exc.detail
    else:
        detail = "not an event"
    if delivery is None or delivery.batch or len(delivery.events) != 1:
        metrics.JOURNAL_ERRORS.labels("bad_event").inc()
        log.warning("journal_event_skipped", position=entry.position, detail=detail)
        return None
    return delivery.events[0]
