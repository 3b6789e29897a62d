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
import logging
import os
import re
import threading
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
SHUTDOWN_SECONDS: Final = 3.0  # the last spans' export at exit, within every stop budget
# W3C Trace Context, version 00: what a caller may ask us to continue (anything else: a new trace)
TRACEPARENT: Final = re.compile(r"00-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}")
MAX_TRACESTATE: Final = 512  # W3C: at least 512 characters must be carried; more may be cut


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
    that also becomes OpenTelemetry's global one. Traces that cannot be had (the extra missing,
    no known exporter, a setting the SDK refuses) are one warning, never a failed start."""
    environ = os.environ if environ is None else environ
    if not asked_for(environ):
        return None
    names = [n.strip() for n in environ.get("OTEL_TRACES_EXPORTER", "otlp").lower().split(",")]
    known = list(dict.fromkeys(n for n in names if n in EXPORTERS))
    if len(known) < len([n for n in names if n]):
        log.warning("tracing_exporter_unknown", exporters=names, known=list(EXPORTERS))
    protocol = environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or environ.get(
        "OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"
    )
    if "otlp" in known and protocol.strip().lower() != "http/protobuf":
        log.warning(
            "tracing_protocol_unsupported",
            protocol=protocol,
            detail="spans go over OTLP/HTTP with protobuf (port 4318), whatever this says",
        )
    if not known:
        return None
    try:
        tracing = Tracing(_provider(known))
    except ImportError:
        log.warning(
            "tracing_unavailable",
            detail="OTEL_* variables ask for traces, but OpenTelemetry is not installed: "
            "pip install 'events-bridge[otel]'",
        )
        return None
    except ValueError as exc:  # the SDK refuses a setting (OTEL_BSP_*, a sampler argument)
        log.warning("tracing_unavailable", detail=f"OpenTelemetry refused a setting: {exc}")
        return None
    from opentelemetry import trace

    trace.set_tracer_provider(tracing.provider)
    log.info("tracing_enabled", exporters=known, service=tracing.service)
    return tracing


def _provider(exporters: list[str]) -> TracerProvider:
    """A tracer provider with a batching processor per exporter (their settings from OTEL_*)."""
    from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    # OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES name the service; else events-bridge.
    resource = Resource.create({SERVICE_VERSION: __version__})
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: SCOPE}))
    # The sampler from OTEL_TRACES_SAMPLER. Not shut down at exit: Tracing.shutdown bounds it.
    provider = TracerProvider(resource=resource, shutdown_on_exit=False)
    for name in exporters:
        if name == "console":
            provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
        else:  # HTTP/protobuf; the exporter reads OTEL_EXPORTER_OTLP_* itself
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return provider


class Tracing:
    """A tracer, the W3C propagator, and the provider to shut down at the end."""

    def __init__(self, provider: TracerProvider) -> None:
        from opentelemetry.sdk.resources import SERVICE_NAME
        from opentelemetry.trace import SpanKind, StatusCode, get_current_span
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.server, self.error = SpanKind.SERVER, StatusCode.ERROR
        self.current_span = get_current_span
        self.provider = provider
        self.service = provider.resource.attributes.get(SERVICE_NAME)
        self.tracer: Tracer = provider.get_tracer(SCOPE, __version__)
        self.propagator = TraceContextTextMapPropagator()
        # The SDK warns of every malformed trace header, quoting it: anyone could write to our
        # log that way. Headers are checked here before it sees them (incoming_context).
        logging.getLogger("opentelemetry.trace").setLevel(logging.ERROR)

    def shutdown(self, seconds: float = SHUTDOWN_SECONDS) -> None:
        """Export what is pending, for at most ``seconds`` (a collector that does not answer
        would hold the exit for 30 s, past any stop budget); blocks: run it in a thread."""
        flush = threading.Thread(target=self.provider.shutdown, name="trace-flush", daemon=True)
        flush.start()
        flush.join(seconds)
        if flush.is_alive():
            log.warning("tracing_flush_abandoned", seconds=seconds)

    def incoming_context(self, headers: Mapping[str, str]) -> Any:
        """The caller's trace context, from a well-formed ``traceparent`` (and a ``tracestate``
        of at most 512 characters); else none: a new trace starts here."""
        carrier: dict[str, str] = {}
        parent = headers.get("traceparent")
        if parent is not None and TRACEPARENT.fullmatch(parent):
            carrier["traceparent"] = parent
            state = headers.get("tracestate")
            if state is not None and len(state) <= MAX_TRACESTATE:
                carrier["tracestate"] = state
        return self.propagator.extract(carrier)

    async def webhook(
        self,
        request: web.Request,
        registration: str,
        handle: Callable[[], Awaitable[web.Response]],
        fields: dict[str, Any],
    ) -> web.Response:
        """``handle()`` inside the request's server span, a child of the incoming
        ``traceparent`` when there is one; the answer's status on the span."""
        parent = self.incoming_context(request.headers)
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
