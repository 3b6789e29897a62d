"""The consumer helper's spans: one per handler call, continuing the message's ``traceparent``.

Owns: the span :class:`bridge.consumer.Consumer` runs each handler call in, where OpenTelemetry
is installed (``events-bridge[otel]``), from its global tracer provider or the one given, and
what became of the event, set on that span (a handler's failure is an error there: the helper
caught it to retry, dead-letter or skip, so the span would not see it). Without a configured SDK
a span costs nothing. Does not: decide what becomes of an event (``bridge.consumer`` does), or
trace the daemon (``bridge.tracing``).
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bridge.consumer import ReceivedEvent


class ConsumerTracing:
    """A consumer span per handler call, continuing the message's ``traceparent``."""

    def __init__(self, provider: Any) -> None:
        # OpenTelemetry is an optional extra: imported only here, ImportError meaning no spans.
        from opentelemetry import trace  # noqa: PLC0415
        from opentelemetry.trace.propagation.tracecontext import (  # noqa: PLC0415
            TraceContextTextMapPropagator,
        )

        self.tracer = (provider or trace.get_tracer_provider()).get_tracer("events-bridge.consumer")
        self.kind, self.error = trace.SpanKind.CONSUMER, trace.StatusCode.ERROR
        self.propagator = TraceContextTextMapPropagator()

    def outcome(self, span: Any, failure: Exception | None, outcome: str) -> None:
        """``outcome``: handled, retried, dead_lettered (a queue) or skipped (a stream)."""
        span.set_attribute("events_bridge.outcome", outcome)
        if failure is not None:
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


def consumer_tracing(provider: Any) -> ConsumerTracing | None:
    """Spans for the consumer helper, or None where OpenTelemetry is not installed."""
    try:
        return ConsumerTracing(provider)
    except ImportError:
        return None


def _text(value: Any) -> str | None:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value if isinstance(value, str) else None
