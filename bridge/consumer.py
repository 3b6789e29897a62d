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
  ``x-dead-letter-exchange`` (declare it in the topology) with an ``x-death`` history. After a
  retry the message's routing key is the queue's name (the retry queue dead-letters it back by
  name), so make that exchange a fanout; the original key is in ``x-bridge-routing-key`` and in
  :attr:`ReceivedEvent.routing_key`.

The work queue must exist (the bridge's topology declares it); the helper declares only its retry
queue. Does not: publish events, or know anything of HTTP.

Traces: where OpenTelemetry is installed (``events-bridge[otel]``), the handler runs inside a
consumer span that continues the message's ``traceparent`` (set by the bridge: the trace of the
webhook request that brought the event), from OpenTelemetry's global tracer provider or the one
given; spans the handler makes are its children. Without a configured SDK the span costs nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aio_pika
import aio_pika.abc
import structlog

from bridge.adobe.envelope import parse_delivery
from bridge.adobe.jobstatus import job_id, job_status
from bridge.dedup import RecentIds
from bridge.errors import BadRequest

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
    )


Handler = Callable[[ReceivedEvent], Awaitable[None]]


class Consumer:
    """Consume one queue with retries, dead-lettering and deduplication (module docstring)."""

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
    ) -> None:
        if max_attempts < 1 or prefetch < 1 or retry_delay < 0:
            raise ValueError("max_attempts and prefetch must be >= 1, retry_delay >= 0")
        self.url, self.queue_name, self.handler = url, queue, handler
        self.prefetch, self.max_attempts, self.retry_delay = prefetch, max_attempts, retry_delay
        self.retry_queue_name = f"{queue}.retry"
        self.seen = RecentIds(dedup_size, dedup_seconds)
        self.counts = {"handled": 0, "retried": 0, "dead_lettered": 0, "duplicates": 0}
        self._connection: aio_pika.abc.AbstractRobustConnection | None = None
        self._channel: aio_pika.abc.AbstractChannel | None = None
        self._stopped = asyncio.Event()
        self._in_flight: dict[str, asyncio.Future[None]] = {}
        self._tracing = _consumer_tracing(tracer_provider)

    async def start(self) -> None:
        """Connect, declare the retry queue, and start consuming (returns once consuming)."""
        self._connection = await aio_pika.connect_robust(
            self.url, client_properties={"connection_name": f"consumer {self.queue_name}"}
        )
        channel = await self._connection.channel(publisher_confirms=True, on_return_raises=True)
        await channel.set_qos(prefetch_count=self.prefetch)
        await channel.declare_queue(
            self.retry_queue_name,
            durable=True,
            arguments={
                "x-message-ttl": int(self.retry_delay * 1000),
                "x-dead-letter-exchange": "",  # the default exchange: straight back to the queue
                "x-dead-letter-routing-key": self.queue_name,
            },
        )
        queue = await channel.get_queue(self.queue_name, ensure=True)
        await queue.consume(self._on_message)
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
        try:
            await self._handle(message)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - never leave a message unsettled
            # Dead-lettered, not requeued: a requeue would bring it straight back, forever.
            log.error("message_handling_failed", message_id=message.message_id, error=repr(exc))
            with contextlib.suppress(Exception):
                await message.reject(requeue=False)

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
            if self._tracing is None:
                await self._run_handler(message, event)
            else:
                with self._tracing.span(self.queue_name, event) as span:
                    failure = await self._run_handler(message, event)
                    self._tracing.outcome(span, failure, event.attempt >= self.max_attempts)
        finally:
            del self._in_flight[event.event_id]
            done.set_result(None)

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
        self.counts["dead_lettered"] += 1
        await message.reject(requeue=False)


class _ConsumerTracing:
    """A consumer span per handled event, continuing the message's ``traceparent``."""

    def __init__(self, provider: Any) -> None:
        from opentelemetry import trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.tracer = (provider or trace.get_tracer_provider()).get_tracer("events-bridge.consumer")
        self.kind, self.error = trace.SpanKind.CONSUMER, trace.StatusCode.ERROR
        self.propagator = TraceContextTextMapPropagator()

    def outcome(self, span: Any, failure: Exception | None, last: bool) -> None:
        """What became of the event, on its span: a handler's failure is an error there (the
        helper caught it to retry or dead-letter, so the span would not see it)."""
        if failure is None:
            span.set_attribute("events_bridge.outcome", "handled")
            return
        permanent = last or isinstance(failure, PermanentFailure)
        span.set_attribute("events_bridge.outcome", "dead_lettered" if permanent else "retried")
        span.record_exception(failure)
        span.set_status(self.error, type(failure).__name__)

    def span(self, queue: str, event: ReceivedEvent) -> contextlib.AbstractContextManager[Any]:
        carrier = {
            k: v for k in ("traceparent", "tracestate") if (v := _text(event.headers.get(k)))
        }
        return self.tracer.start_as_current_span(
            f"{queue} process",
            context=self.propagator.extract(carrier),
            kind=self.kind,
            attributes={
                "messaging.system": "rabbitmq",
                "messaging.operation.type": "process",
                "messaging.destination.name": queue,
                "messaging.message.id": event.event_id,
                "messaging.rabbitmq.destination.routing_key": event.routing_key,
                "events_bridge.event_code": event.event_code,
            },
        )


def _consumer_tracing(provider: Any) -> _ConsumerTracing | None:
    try:
        return _ConsumerTracing(provider)
    except ImportError:  # OpenTelemetry is not installed: no spans
        return None
