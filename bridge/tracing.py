"""Traces, when asked for: an OpenTelemetry span per webhook request, with a child for each step
of the road (``verify``, ``route``, ``publish``, and ``outbox`` when the broker did not take the
events), the incoming W3C ``traceparent`` continued, and ``traceparent``/``tracestate`` set on
every AMQP message so that consumers continue the same trace (``bridge.consumer`` does).

Owns: whether tracing is on (:func:`from_environment`), the tracer provider's lifetime, the
request span (:meth:`Tracing.webhook`) and :class:`TracedIntake`, the intake with its steps in
spans. Configuration is OpenTelemetry's own, the standard ``OTEL_*`` variables: tracing is on
when the ``otel`` extra is installed (``pip install 'events-bridge[otel]'``) and
``OTEL_TRACES_EXPORTER`` (``otlp``, ``console``) or an ``OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT``
is set, unless ``OTEL_SDK_DISABLED=true`` or the exporter is ``none``. OTLP goes over HTTP
(protobuf); ``OTEL_SERVICE_NAME`` (default ``events-bridge``), ``OTEL_RESOURCE_ATTRIBUTES``,
``OTEL_TRACES_SAMPLER``, ``OTEL_BSP_*`` and ``OTEL_EXPORTER_OTLP_*`` work as the SDK documents.

Off, it costs nothing: the receiver and the app keep the plain :class:`~bridge.intake.Intake`
and check one attribute for None per request. Spans are exported from the SDK's own thread.
Does not: trace anything but webhook requests and the consumer helper.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Final

import structlog

from bridge import __version__
from bridge.errors import BrokerUnavailable, Refusal
from bridge.intake import Arrival, Intake, Plan
from bridge.message import Outbound, RequestContext

if TYPE_CHECKING:
    from aiohttp import web
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span, Tracer

    from bridge.adobe.envelope import Delivery, Event
    from bridge.routing import Router

log = structlog.get_logger("bridge.tracing")

SCOPE: Final = "events-bridge"
TRACE_HEADERS: Final = ("traceparent", "tracestate")  # W3C Trace Context, on every message
EXPORTERS: Final = ("otlp", "console")


def asked_for(environ: Mapping[str, str]) -> bool:
    """Whether the ``OTEL_*`` variables ask for traces (see the module docstring)."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporters = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporters:
        return exporters != "none"
    return any(
        environ.get(name)
        for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )


def from_environment(environ: Mapping[str, str] | None = None) -> Tracing | None:
    """Tracing as the ``OTEL_*`` variables ask (None: off), with a tracer provider of its own
    that also becomes OpenTelemetry's global one. One warning when they ask for traces that
    cannot be had (the extra is missing, an exporter unknown)."""
    environ = os.environ if environ is None else environ
    if not asked_for(environ):
        return None
    try:
        from opentelemetry import trace
        from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource
        from opentelemetry.sdk.trace import TracerProvider
    except ImportError:
        log.warning(
            "tracing_unavailable",
            detail="OTEL_* variables ask for traces, but OpenTelemetry is not installed: "
            "pip install 'events-bridge[otel]'",
        )
        return None
    names = [n.strip() for n in environ.get("OTEL_TRACES_EXPORTER", "otlp").lower().split(",")]
    unknown = [n for n in names if n and n not in EXPORTERS]
    if unknown:
        log.warning("tracing_exporter_unknown", exporters=unknown, known=list(EXPORTERS))
    # OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES name the service; else events-bridge.
    resource = Resource.create({SERVICE_VERSION: __version__})
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: SCOPE}))
    provider = TracerProvider(resource=resource)  # the sampler from OTEL_TRACES_SAMPLER
    for name in dict.fromkeys(n for n in names if n in EXPORTERS):
        provider.add_span_processor(_processor(name))
    trace.set_tracer_provider(provider)
    log.info(
        "tracing_enabled",
        exporters=[n for n in names if n in EXPORTERS],
        service=resource.attributes.get(SERVICE_NAME),
    )
    return Tracing(provider)


def _processor(exporter: str) -> Any:
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    if exporter == "console":
        return BatchSpanProcessor(ConsoleSpanExporter())
    # HTTP/protobuf, the OTLP default port 4318; the exporter reads OTEL_EXPORTER_OTLP_* itself.
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return BatchSpanProcessor(OTLPSpanExporter())


class Tracing:
    """A tracer, the W3C propagator, and the provider to shut down at the end."""

    def __init__(self, provider: TracerProvider) -> None:
        from opentelemetry.trace import SpanKind, StatusCode, get_current_span
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.server, self.error = SpanKind.SERVER, StatusCode.ERROR
        self.current_span = get_current_span
        self.provider = provider
        self.tracer: Tracer = provider.get_tracer(SCOPE, __version__)
        self.propagator = TraceContextTextMapPropagator()

    def shutdown(self) -> None:
        """Export what is pending (bounded by the exporter's timeout); blocks: run it in a
        thread."""
        self.provider.shutdown()

    async def webhook(
        self,
        request: web.Request,
        registration: str,
        handle: Callable[[], Awaitable[web.Response]],
        fields: dict[str, Any],
    ) -> web.Response:
        """``handle()`` inside the request's server span, a child of the incoming
        ``traceparent`` when there is one; the answer's status on the span."""
        parent = self.propagator.extract(request.headers)
        with self.tracer.start_as_current_span(
            f"{request.method} {request.path}",
            context=parent,
            kind=self.server,
            record_exception=False,
            set_status_on_exception=False,
            attributes={
                "http.request.method": request.method,
                "http.route": request.path,
                "url.path": request.path,
                "events_bridge.registration": registration,
            },
        ) as span:
            fields["trace_id"] = format(span.get_span_context().trace_id, "032x")
            try:
                response = await handle()
            except Refusal as refusal:
                _answered(span, refusal.status, refusal.reason)
                if refusal.status >= 500:
                    span.set_status(self.error, refusal.detail)
                raise
            except Exception as exc:  # a bug: the middleware answers 500
                _answered(span, 500, "crashed")
                span.record_exception(exc)
                span.set_status(self.error, type(exc).__name__)
                raise
            _answered(span, response.status, fields.get("outcome", "ok"))
            for name in ("event_id", "event_code"):  # a single delivery's; a batch's are many
                if isinstance(fields.get(name), str):
                    span.set_attribute(f"events_bridge.{name}", fields[name])
            return response

    @contextlib.contextmanager
    def step(self, name: str, **attributes: Any) -> Iterator[Span]:
        """A child span of the current one, for a step of the road. A refusal is an attribute
        (and an error when it is a 5xx), not an exception event: forged requests are common
        and a traceback each would cost more than the refusal. Under a request that is not
        sampled, nothing: its children would not be recorded either, and making them is most
        of what an unsampled request costs."""
        parent = self.current_span()
        if not parent.is_recording():
            yield parent
            return
        with self.tracer.start_as_current_span(
            name, attributes=attributes, record_exception=False, set_status_on_exception=False
        ) as span:
            try:
                yield span
            except Refusal as refusal:
                span.set_attribute("events_bridge.refusal", refusal.reason)
                if refusal.status >= 500:
                    span.set_status(self.error, refusal.detail)
                raise
            except Exception as exc:
                span.record_exception(exc)
                span.set_status(self.error, type(exc).__name__)
                raise

    def trace_headers(self) -> dict[str, str]:
        """``traceparent`` (and ``tracestate``) of the current span, for the messages."""
        carrier: dict[str, str] = {}
        self.propagator.inject(carrier)
        return {k: v for k, v in carrier.items() if k in TRACE_HEADERS}


def _answered(span: Span, status: int, outcome: str) -> None:
    span.set_attribute("http.response.status_code", status)
    span.set_attribute("events_bridge.outcome", outcome)


class TracedIntake(Intake):
    """The intake with its steps in spans, children of the request's; every message it builds
    carries the request span's ``traceparent`` in place of the incoming one."""

    def __init__(self, tracing: Tracing, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tracing = tracing

    async def _verify(self, arrival: Arrival) -> None:
        signatures = len(arrival.signatures or ())
        with self.tracing.step("verify", **{"events_bridge.signatures": signatures}):
            await super()._verify(arrival)

    def _route(
        self, delivery: Delivery, router: Router, context: RequestContext, events: list[Event]
    ) -> Plan:
        # The current span is the request's: consumers' spans become its children.
        copied = {k: v for k, v in context.copied.items() if k not in TRACE_HEADERS}
        context = dataclasses.replace(context, copied={**copied, **self.tracing.trace_headers()})
        with self.tracing.step("route", **{"events_bridge.events": len(events)}) as span:
            plan = super()._route(delivery, router, context, events)
            span.set_attribute("events_bridge.messages", len(plan.messages))
            return plan

    async def _deliver(self, messages: list[Outbound], deadline: float) -> str:
        exchanges = sorted({m.exchange for m in messages})
        write_ahead = self.outbox is not None and self.config.outbox.mode == "always"
        with self.tracing.step(
            "outbox" if write_ahead else "publish",
            **{
                "messaging.system": "rabbitmq",
                "messaging.operation.type": "publish",
                "messaging.destination.name": ",".join(exchanges),
                "messaging.batch.message_count": len(messages),
            },
        ) as span:
            status = await super()._deliver(messages, deadline)
            span.set_attribute("events_bridge.outcome", status)
            return status

    async def _keep(self, messages: list[Outbound], exc: BrokerUnavailable) -> str:
        with self.tracing.step("outbox", **{"events_bridge.reason": exc.reason}) as span:
            status = await super()._keep(messages, exc)
            span.set_attribute("events_bridge.outcome", status)
            return status
