"""A small helper for consumers of events-bridge messages: decode, ack, retry, dead-letter.

Nothing here is needed to consume: the message contract (README, "What is published") is enough,
and ``deploy/examples/node`` consumes with plain amqplib. This helper only saves Python consumers
the usual code::

    async def handle(event: ReceivedEvent) -> None:
        if event.job and event.job.status == "failed":
            ...  # raise to retry later; raise PermanentFailure to dead-letter at once

    consumer = Consumer("amqp://…", "imaging.jobs", handle, max_attempts=3, retry_delay=30)
    await consumer.run()  # until stop() or cancellation

What it does with each message (``prefetch`` at a time):

- decodes it into a :class:`ReceivedEvent` (a job-status event gets a :class:`JobStatus` with its
  job id, status and outputs, each output with its errors as Adobe gave them);
- skips an event id it already handled within a bounded window (count and seconds): Adobe
  delivers at least once, and so does the bridge;
- acks after the handler returns;
- when the handler raises, publishes a copy (with confirms) to ``<queue>.retry``, a queue whose
  message TTL is ``retry_delay`` and whose dead-letter target is the work queue again, then acks:
  the event comes back after the delay, with ``x-bridge-attempt`` counting the attempts;
- after ``max_attempts`` (or on :class:`PermanentFailure`, or a message it cannot decode)
  rejects it without requeue, so the broker dead-letters it through the work queue's own
  ``x-dead-letter-exchange`` (declare it in the topology) with an ``x-death`` history (on
  RabbitMQ 4.x only what happened since the last retry: count with ``x-bridge-attempt``). After a
  retry the message's routing key is the queue's name (the retry queue dead-letters it back by
  name), so make that exchange a fanout; the original key is in ``x-bridge-routing-key`` and in
  :attr:`ReceivedEvent.routing_key`.

The work queue must exist (the bridge's topology declares it); the helper declares only its retry
queue. Does not: publish events, or know anything of HTTP.

A stream (``type: stream`` in the topology) is read with ``offset=``: ``"first"``, ``"last"``,
``"next"``, an offset, a timezone-aware datetime, or how long ago (a timedelta, ``"12h"``), the
``x-stream-offset`` consumer argument (``bridge.streams``). Reading a stream acks every message
(an ack is credit there: the stream keeps it) and dead-letters nothing: a failed handler is
retried in place after ``retry_delay``, up to ``max_attempts``; then, as on
:class:`PermanentFailure` or a message it cannot decode, the event is skipped (logged with its
offset, counted in ``counts["skipped"]``) and stays in the stream for a later replay. Each
:class:`ReceivedEvent` carries its ``offset``; after a reconnect reading resumes at the first
message not yet handled. Replaying is reading again with a new Consumer. For a stream the
helper declares nothing.

Traces: where OpenTelemetry is installed (``events-bridge[otel]``), the handler runs inside a
consumer span that continues the message's ``traceparent`` (set by the bridge: the trace of the
webhook request that brought the event), from OpenTelemetry's global tracer provider or the one
given; spans the handler makes are its children (``bridge.consumer_tracing``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aio_pika
import aio_pika.abc
import structlog

from bridge.adobe.envelope import parse_delivery
from bridge.adobe.jobstatus import job_id, job_status
from bridge.consumer_tracing import consumer_tracing
from bridge.dedup import RecentIds
from bridge.errors import BadRequest
from bridge.streams import StreamOffset, StreamPosition, message_offset

log = structlog.get_logger("bridge.consumer")

ATTEMPT_HEADER = "x-bridge-attempt"
ROUTING_KEY_HEADER = "x-bridge-routing-key"  # the original key, kept across the retry queue
_ERROR_FIELDS = ("errors", "error", "errorDetails", "details")


class PermanentFailure(Exception):
    """Raise from a handler to dead-letter the event now, without retries."""


@dataclass(frozen=True)
class JobOutput:
    status: str | None
    input: str | None
    errors: Any  # as Adobe gave them: errors, error, errorDetails or details; None if none
    document: dict[str, Any]


@dataclass(frozen=True)
class JobStatus:
    job_id: str | None
    status: str | None  # the bridge's aggregate: succeeded, failed, running, pending, ...
    outputs: tuple[JobOutput, ...]


@dataclass(frozen=True)
class ReceivedEvent:
    event_id: str
    event_code: str
    routing_key: str
    body: bytes
    document: dict[str, Any]
    headers: dict[str, Any]
    attempt: int  # 1 for the first delivery to the handler, 2 after one retry, ...
    job: JobStatus | None
    offset: int | None = None  # read from a stream: the message's offset there


def _text(value: Any) -> str | None:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value if isinstance(value, str) else None


def _job(document: dict[str, Any], envelope: str, headers: dict[str, Any]) -> JobStatus | None:
    if envelope == "cloudevents":
        payload = document.get("data")
    else:
        inner = document.get("event")
        payload = inner.get("body") if isinstance(inner, dict) else None
    status = _text(headers.get("job-status")) or job_status(payload)
    if status is None or not isinstance(payload, dict):
        return None
    outputs = tuple(
        JobOutput(
            status=_text(o.get("status")),
            input=_text(o.get("input")),
            errors=next((o[f] for f in _ERROR_FIELDS if o.get(f) is not None), None),
            document=o,
        )
        for o in (payload["outputs"] if isinstance(payload.get("outputs"), list) else [])
        if isinstance(o, dict)
    )
    return JobStatus(_text(headers.get("job-id")) or job_id(payload), status, outputs)


def decode(message: aio_pika.abc.AbstractIncomingMessage) -> ReceivedEvent:
    """Turn a message the bridge published into a :class:`ReceivedEvent`.

    Raises :class:`ValueError` for a body that is not one event.
    """
    headers = dict(message.headers or {})
    try:
        delivery = parse_delivery(
            message.body,
            message.message_id or _text(headers.get("event-id")),
            message.type or _text(headers.get("event-code")),
        )
    except BadRequest as exc:
        raise ValueError(exc.detail) from None
    except Exception as exc:  # noqa: BLE001 - whatever a body does to the parser: undecodable
        raise ValueError(f"{type(exc).__name__}: {exc}") from None
    if len(delivery.events) != 1:
        raise ValueError("the body is not one event")
    event = delivery.events[0]
    attempt = headers.get(ATTEMPT_HEADER, 1)
    return ReceivedEvent(
        event_id=message.message_id or event.event_id,
        event_code=message.type or event.event_code,
        routing_key=_text(headers.get(ROUTING_KEY_HEADER)) or message.routing_key or "",
        body=message.body,
        document=event.document,
        headers=headers,
        attempt=attempt if isinstance(attempt, int) and attempt > 0 else 1,
        job=_job(event.document, event.envelope, headers),
        offset=message_offset(headers),
    )


Handler = Callable[[ReceivedEvent], Awaitable[None]]


class Consumer:
    """Consume one queue with retries, dead-lettering and deduplication, or read a stream from
    ``offset`` (module docstring)."""

    def __init__(
        self,
        url: str,
        queue: str,
        handler: Handler,
        *,
        prefetch: int = 16,
        max_attempts: int = 3,
        retry_delay: float = 5.0,
        dedup_size: int = 10_000,
        dedup_seconds: float = 3600.0,
        tracer_provider: Any = None,
        offset: StreamOffset | None = None,
    ) -> None:
        if max_attempts < 1 or prefetch < 1 or retry_delay < 0:
            raise ValueError("max_attempts and prefetch must be >= 1, retry_delay >= 0")
        self.url, self.queue_name, self.handler = url, queue, handler
        self.prefetch, self.max_attempts, self.retry_delay = prefetch, max_attempts, retry_delay
        self.retry_queue_name = f"{queue}.retry"
        self.seen = RecentIds(dedup_size, dedup_seconds)
        # A stream: where this reader stands (None: a queue, consumed destructively).
        self.stream = None if offset is None else StreamPosition(offset)
        given_up = "dead_lettered" if self.stream is None else "skipped"
        self.counts = {"handled": 0, "retried": 0, given_up: 0, "duplicates": 0}
        self._connection: aio_pika.abc.AbstractRobustConnection | None = None
        self._channel: aio_pika.abc.AbstractChannel | None = None
        self._stopped = asyncio.Event()
        self._in_flight: dict[str, asyncio.Future[None]] = {}
        self._tracing = consumer_tracing(tracer_provider)

    async def start(self) -> None:
        """Connect, declare the retry queue (not for a stream), and start consuming (returns
        once consuming). A stream needs the prefetch (per consumer) and manual acks: both set."""
        self._connection = await aio_pika.connect_robust(
            self.url, client_properties={"connection_name": f"consumer {self.queue_name}"}
        )
        channel = await self._connection.channel(publisher_confirms=True, on_return_raises=True)
        await channel.set_qos(prefetch_count=self.prefetch)
        if self.stream is None:
            await channel.declare_queue(
                self.retry_queue_name,
                durable=True,
                arguments={
                    "x-message-ttl": int(self.retry_delay * 1000),
                    "x-dead-letter-exchange": "",  # the default exchange: back to the queue
                    "x-dead-letter-routing-key": self.queue_name,
                },
            )
        queue = await channel.get_queue(self.queue_name, ensure=True)
        arguments = None if self.stream is None else self.stream.arguments
        await queue.consume(self._on_message, arguments=arguments)
        self._channel = channel

    async def run(self) -> None:
        """Start, then consume until :meth:`stop` (or cancellation)."""
        await self.start()
        try:
            await self._stopped.wait()
        finally:
            await self.close()

    def stop(self) -> None:
        self._stopped.set()

    async def close(self) -> None:
        if self._connection is not None:
            with contextlib.suppress(Exception):
                await self._connection.close()
            self._connection = None

    async def _on_message(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        offset = message_offset(message.headers)
        if self.stream is not None and not self.stream.take(offset):
            await message.ack()  # read again after a reconnect: handled already
            return
        try:
            await self._handle(message)
        except asyncio.CancelledError:
            raise  # a stream's position stays before it: read again after a reconnect
        except Exception as exc:  # noqa: BLE001 - never leave a message unsettled
            # Dead-lettered, not requeued: a requeue would bring it straight back, forever.
            log.error("message_handling_failed", message_id=message.message_id, error=repr(exc))
            with contextlib.suppress(Exception):
                await message.reject(requeue=False)
        if self.stream is not None:
            self.stream.done(offset)

    async def _handle(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        try:
            event = decode(message)
        except ValueError as exc:
            log.warning("message_undecodable", message_id=message.message_id, error=str(exc))
            await self._dead_letter(message)
            return
        # A copy of the same event already in the handler (prefetch > 1): wait for it first.
        while (running := self._in_flight.get(event.event_id)) is not None:
            await asyncio.shield(running)
        if event.event_id in self.seen:
            self.counts["duplicates"] += 1
            await message.ack()
            return
        done = asyncio.get_running_loop().create_future()
        self._in_flight[event.event_id] = done
        try:
            failure = await self._attempt(message, event)
            while self._retry_here(event, failure):  # a stream keeps it: retried in place
                await asyncio.sleep(self.retry_delay)
                event = dataclasses.replace(event, attempt=event.attempt + 1)
                failure = await self._attempt(message, event)
        finally:
            del self._in_flight[event.event_id]
            done.set_result(None)

    async def _attempt(
        self, message: aio_pika.abc.AbstractIncomingMessage, event: ReceivedEvent
    ) -> Exception | None:
        if self._tracing is None:
            return await self._run_handler(message, event)
        with self._tracing.span(self.queue_name, event) as span:
            failure = await self._run_handler(message, event)
            self._tracing.outcome(span, failure, self._outcome(event, failure))
        return failure

    def _outcome(self, event: ReceivedEvent, failure: Exception | None) -> str:
        """What became of the event after this attempt: handled, retried, or given up."""
        if failure is None:
            return "handled"
        if event.attempt >= self.max_attempts or isinstance(failure, PermanentFailure):
            return "dead_lettered" if self.stream is None else "skipped"
        return "retried"

    def _retry_here(self, event: ReceivedEvent, failure: Exception | None) -> bool:
        return self.stream is not None and self._outcome(event, failure) == "retried"

    async def _run_handler(
        self, message: aio_pika.abc.AbstractIncomingMessage, event: ReceivedEvent
    ) -> Exception | None:
        """Run the handler and settle the message; what the handler raised, if anything."""
        try:
            await self.handler(event)
        except asyncio.CancelledError:
            raise
        except PermanentFailure as exc:
            log.warning("event_failed_permanently", event_id=event.event_id, error=str(exc))
            await self._dead_letter(message)
            return exc
        except Exception as exc:  # noqa: BLE001 - any handler failure means: retry, then dead-letter
            await self._failed(message, event, exc)
            return exc
        self.seen.add(event.event_id)
        self.counts["handled"] += 1
        await message.ack()
        return None

    async def _failed(
        self, message: aio_pika.abc.AbstractIncomingMessage, event: ReceivedEvent, exc: Exception
    ) -> None:
        if event.attempt >= self.max_attempts or self._channel is None:
            log.warning(
                "event_dead_lettered",
                event_id=event.event_id,
                attempts=event.attempt,
                error=repr(exc),
            )
            await self._dead_letter(message)
            return
        log.info(
            "event_retry_scheduled",
            event_id=event.event_id,
            attempt=event.attempt,
            retry_in=self.retry_delay,
            error=repr(exc),
        )
        if self.stream is not None:  # no retry queue: _handle calls the handler again
            self.counts["retried"] += 1
            return
        headers = {
            **event.headers,
            ATTEMPT_HEADER: event.attempt + 1,
            ROUTING_KEY_HEADER: event.routing_key,
        }
        copy = aio_pika.Message(
            body=message.body,
            headers=headers,
            content_type=message.content_type,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=message.message_id,
            type=message.type,
            timestamp=message.timestamp,
            app_id=message.app_id,
        )
        # Confirmed (and not returned: mandatory) before the ack: a crash or a missing retry
        # queue redelivers the event, never loses it.
        await self._channel.default_exchange.publish(copy, self.retry_queue_name, mandatory=True)
        self.counts["retried"] += 1
        await message.ack()

    async def _dead_letter(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        if self.stream is not None:  # a stream cannot dead-letter: the event stays there
            self.counts["skipped"] += 1
            offset = message_offset(message.headers)
            log.warning("stream_event_skipped", queue=self.queue_name, offset=offset)
            await message.ack()
            return
        self.counts["dead_lettered"] += 1
        await message.reject(requeue=False)
