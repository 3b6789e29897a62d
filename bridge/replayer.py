"""The outbox's replayer: publishes the backlog oldest first, with confirms, once the broker can
take it; a record is forgotten only after its confirm (the README, "Delivery semantics").

- **In doubt.** A publish that timed out may still be confirmed: the publisher hands over its
  open confirm with the message. The replayer waits for that verdict (at most
  ``publisher.DOUBT_SECONDS``) and replays the record only if it is not an ack, so a slow
  confirm and the stored copy never both reach the queue.
- **Poison records.** A record no broker takes as it is (the publisher refuses it before
  sending), or one the broker refuses alone :data:`STRIKES` times by closing the channel or
  connection over it, goes to the quarantine file with its reason: counted, logged, never
  replayed, and never in the way of the records behind it. After a close that names no message,
  the replayer sends the records it was sending one at a time (*isolating*), to find the one.
- **Requeue.** The oldest record failing :data:`REQUEUE_AFTER` times (nacked, returned) while
  others go through is written again behind them, so that the cursor moves on.
- **Stalled.** ``failing_since``: since when the publishes to a connected broker make no
  progress; once that lasts ``outbox.stall_seconds``, ``Outbox.stalled`` (and ``/readyz``) says
  so.

Does not: touch the files (``bridge.outbox`` and ``bridge.spool`` do: appends, the cursor, the
quarantine), or talk AMQP itself: it calls the publisher.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import TYPE_CHECKING, Any, Final

import structlog
from pamqp.commands import Basic

from bridge import metrics
from bridge.errors import BrokerUnavailable, Unavailable
from bridge.message import Outbound
from bridge.publisher import DOUBT_SECONDS, unsafe_and_refused
from bridge.spool import Record

if TYPE_CHECKING:
    from bridge.outbox import Outbox

log = structlog.get_logger("bridge.outbox")

REPLAY_BATCH: Final = 64
STRIKES: Final = 2  # refusals of a record sent alone before it is quarantined
REQUEUE_AFTER: Final = 3  # failures of the oldest record before it goes behind the others
FIRST_DELAY: Final = 0.2  # the backoff between failed attempts, doubled up to MAX_DELAY
MAX_DELAY: Final = 5.0


class Replayer:
    """The replay task of ``outbox`` (:meth:`run`); see the module docstring."""

    def __init__(self, outbox: Outbox) -> None:
        self.outbox = outbox
        self.spool = outbox.spool
        self.replayed = 0
        self.failing_since: float | None = None  # since when no attempt made progress
        self._wake = asyncio.Event()
        self._isolate = 0  # records still to send one at a time (see the module docstring)
        self._delay = FIRST_DELAY

    def wake(self) -> None:
        """Something changed (records appended, a late verdict): look again."""
        self._wake.set()

    async def run(self) -> None:
        while True:
            try:
                await self._replay()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the replayer must outlive any one failure
                log.error("outbox_replayer_failed", error=repr(exc), retry_in=1.0)
                await asyncio.sleep(1.0)

    async def _replay(self) -> None:
        self._delay = FIRST_DELAY
        while True:
            await self.outbox.advance()
            if not self.spool.records:
                self.failing_since = None
                self._wake.clear()
                await self._wake.wait()
                continue
            head = self.spool.head()
            if head is None:  # settled meanwhile (late confirms): forget them
                continue
            if head.poison is not None:  # its quarantine write failed: that, not a publish
                if not await self._quarantine_poison():
                    await self._back_off()
                continue
            if head.doubt is not None and not head.doubt.done():
                await self._await_verdict(head, head.doubt)
                continue
            if not self.outbox.publisher.ready:
                await asyncio.sleep(self._delay)
                continue
            await self._send(self._next_batch())

    async def _back_off(self) -> None:
        await asyncio.sleep(self._delay)
        self._delay = min(self._delay * 2, MAX_DELAY)

    async def _await_verdict(self, head: Record, doubt: asyncio.Future[Any]) -> None:
        """Its publish may yet be confirmed: wait for the verdict, not a second copy."""
        await asyncio.wait({doubt}, timeout=DOUBT_SECONDS + 1.0)
        if not doubt.done():  # the publisher's own bound did not come: go on
            head.doubt = None

    def _next_batch(self) -> list[Record]:
        """The oldest records to send: up to a batch, one while isolating, none past a record
        whose earlier publish is still in doubt."""
        size = 1 if self._isolate else REPLAY_BATCH
        batch: list[Record] = []
        for record in self.spool.records:
            if record.settled or record.poison is not None:
                continue
            if record.doubt is not None and not record.doubt.done():
                break
            batch.append(record)
            if len(batch) == size:
                break
        return batch

    async def _send(self, batch: list[Record]) -> None:
        sending = [self._homed(r.message) for r in batch]
        try:
            await self.outbox.publisher.publish(sending)
        except BrokerUnavailable as exc:
            if not await self._after_failure(batch, sending, exc):
                if self.failing_since is None:
                    self.failing_since = time.monotonic()
                log.warning(
                    "outbox_replay_failed",
                    reason=exc.reason,
                    events=len(batch),
                    retry_in=self._delay,
                )
                await self._back_off()
            return
        for record in batch:
            record.settled = True
        metrics.count_published(r.message for r in batch)
        self._replayed(len(batch))
        self.failing_since = None
        self._delay = FIRST_DELAY

    def _homed(self, message: Outbound) -> Outbound:
        """A record whose exchange the topology no longer has would fail forever (and close the
        publish channel each time): it is replayed to the unrouted exchange instead."""
        exchanges = self.outbox.exchanges
        if exchanges is None or message.exchange in exchanges:
            return message
        return dataclasses.replace(message, exchange=self.outbox.unrouted_exchange)

    def _replayed(self, count: int) -> None:
        self.replayed += count
        metrics.OUTBOX_REPLAYED.inc(count)
        self._isolate = max(0, self._isolate - count)

    # -- after a failed publish -----------------------------------------------------------------

    async def _after_failure(
        self, batch: list[Record], sending: list[Outbound], exc: BrokerUnavailable
    ) -> bool:
        """Settle what the failed publish did confirm, keep its doubts, and quarantine what is
        poison; True when some record was settled (progress)."""
        confirmed = self._judge(batch, sending, exc)
        progress = bool(confirmed)
        if any(r.poison is not None for r in batch):
            progress = await self._quarantine_poison() or progress
        if confirmed:  # others go through, the oldest does not: it must not hold them up
            await self._requeue_stuck()
        return progress  # a requeue is no progress: the backoff goes on

    def _judge(
        self, batch: list[Record], sending: list[Outbound], exc: BrokerUnavailable
    ) -> list[Record]:
        """What the failure says of each record sent: confirmed (settled now), in doubt, failed,
        or poison; the records confirmed."""
        unsafe, refused = unsafe_and_refused(exc, sending)
        record_of = {id(out): record for out, record in zip(sending, batch, strict=True)}
        not_confirmed = {id(out) for out, _ in unsafe} | {id(out) for out, _ in refused}
        confirmed = [
            r for out, r in zip(sending, batch, strict=True) if id(out) not in not_confirmed
        ]
        for record in confirmed:
            record.settled = True
        metrics.count_published(r.message for r in confirmed)
        if confirmed:
            self._replayed(len(confirmed))
        for out, doubt in unsafe:
            record = record_of[id(out)]
            if doubt is not None:
                self.await_late(record, doubt)
            else:
                record.failures += 1
        for out, why in refused:
            record_of[id(out)].poison = ("unpublishable", why)
        if exc.reason == "broker_refused" and not refused:
            self._strike(batch, exc.detail)
        return confirmed

    def _strike(self, batch: list[Record], detail: str) -> None:
        """The broker closed the channel over one of ``batch``, naming none."""
        if len(batch) > 1:
            self._isolate = len(batch)  # which one? send them one at a time to find out
            return
        record = batch[0]
        record.strikes += 1
        if record.strikes >= STRIKES:
            record.poison = ("broker_refused", detail)

    async def _quarantine_poison(self) -> bool:
        """Move every record found poison to the quarantine; False if it cannot be written
        (they are not sent again meanwhile: the write is what is retried)."""
        poison = [r for r in self.spool.records if r.poison is not None and not r.settled]
        if not poison:
            return False
        try:
            await self.outbox.quarantine([(r.message, *r.poison) for r in poison if r.poison])
        except OSError as exc:
            log.error("outbox_quarantine_failed", error=str(exc), events=len(poison))
            return False
        for record in poison:
            record.settled = True
        self._isolate = max(0, self._isolate - len(poison))
        return True

    async def _requeue_stuck(self) -> bool:
        """The oldest record keeps failing (nacked, returned) while others go through: it goes
        behind them, written again, so that the cursor and the space behind it move on."""
        waiting = [r for r in self.spool.records if not r.settled]
        head = waiting[0] if waiting else None
        if head is None or head.failures < REQUEUE_AFTER or len(waiting) < 2:
            return False
        try:
            await self.outbox.append([head.message])
        except Unavailable:  # full or unwritable: it stays where it is, and is retried there
            return False
        head.settled = True
        self.spool.requeued = True
        log.warning(
            "outbox_record_requeued",
            message_id=head.message.message_id,
            failures=head.failures,
            detail="the broker keeps refusing it; the events behind it go first",
        )
        return True

    # -- late verdicts --------------------------------------------------------------------------

    def await_late(self, record: Record, doubt: asyncio.Future[Any]) -> None:
        """``record``'s earlier publish is in doubt: its verdict, when it comes, settles it."""
        record.doubt = doubt
        doubt.add_done_callback(lambda confirmation: self.settle_late(record, confirmation))

    def settle_late(self, record: Record, confirmation: asyncio.Future[Any]) -> None:
        """The verdict on a record's earlier publish came: an ack settles it (no replay)."""
        if confirmation.cancelled() or confirmation.exception() is not None:
            return  # not confirmed: the replayer sends it
        if isinstance(confirmation.result(), Basic.Ack) and not record.settled:
            record.settled = True
            metrics.count_published((record.message,))
        self.wake()
