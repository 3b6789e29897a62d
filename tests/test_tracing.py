"""Traces: when they are on, the spans of a webhook request and their shape (in-process, with the
SDK's in-memory exporter); and one trace id from the incoming ``traceparent`` through the real
daemon (exporting over OTLP/HTTP to a local collector), the message on the real broker, to the
consumer helper's span."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aio_pika
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased, Sampler
from opentelemetry.trace import SpanKind, StatusCode
from structlog.testing import capture_logs

from bridge import tracing
from bridge.app import create_app
from bridge.config import OutboxConfig
from bridge.consumer import Consumer, ReceivedEvent
from bridge.tracing import Tracing, asked_for
from tests.helpers import (
    CLIENT_ID,
    EVENTS,
    KEY_PATH,
    FakePublisher,
    KeyServer,
    SigningKey,
    make_config,
)
from tests.rig import Rig, body_for

Client = TestClient[web.Request, web.Application]
LIGHTROOM = orjson.loads((EVENTS / "imaging_lightroom-job-status_succeeded.json").read_bytes())
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


@pytest.mark.parametrize(
    ("environ", "on"),
    [
        ({}, False),
        ({"OTEL_SERVICE_NAME": "x"}, False),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, True),
        ({"OTEL_TRACES_EXPORTER": "console"}, True),
        ({"OTEL_TRACES_EXPORTER": "none"}, False),
        ({"OTEL_TRACES_EXPORTER": "None ", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"}, True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_SDK_DISABLED": "TRUE"}, False),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "false"}, True),
    ],
)
def test_the_otel_variables_decide_whether_traces_are_on(environ: dict[str, str], on: bool) -> None:
    assert asked_for(environ) is on


def test_no_otel_variables_no_tracing_and_no_word_about_it() -> None:
    with capture_logs() as logs:
        assert tracing.from_environment({}) is None
    assert logs == []


def test_traces_asked_for_without_the_extra_say_so_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry", None)  # as if it were not installed
    with capture_logs() as logs:
        assert tracing.from_environment({"OTEL_TRACES_EXPORTER": "otlp"}) is None
    assert [line["event"] for line in logs] == ["tracing_unavailable"]
    assert "events-bridge[otel]" in logs[0]["detail"]


@dataclasses.dataclass
class Traced:
    client: Client
    publisher: FakePublisher
    spans: InMemorySpanExporter
    signer: SigningKey

    async def post(self, body: bytes, **headers: str) -> int:
        sent = self.signer.headers(body, **headers)
        async with self.client.post("/webhook", data=body, headers=sent) as response:
            return response.status

    def by_name(self) -> dict[str, ReadableSpan]:
        return {span.name: span for span in self.spans.get_finished_spans()}


def in_memory(sampler: Sampler | None = None) -> tuple[TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=sampler)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


@pytest.fixture
async def traced(
    aiohttp_server: Callable[[web.Application], Awaitable[TestServer]],
    aiohttp_client: Callable[[web.Application], Awaitable[Client]],
) -> AsyncIterator[Callable[..., Awaitable[Traced]]]:
    signer = SigningKey.generate()
    keys = KeyServer()
    keys.keys[KEY_PATH] = signer.public_pem
    key_host = str((await aiohttp_server(keys.app())).make_url("")).rstrip("/")
    made: list[Tracing] = []

    async def make(sampler: Sampler | None = None, traces: bool = True, **config: Any) -> Traced:
        provider, exporter = in_memory(sampler)
        made.append(Tracing(provider))
        publisher = FakePublisher()
        app = create_app(
            dataclasses.replace(make_config(key_base_url=key_host), **config),
            publisher,
            tracing=made[-1] if traces else None,
        )
        return Traced(await aiohttp_client(app), publisher, exporter, signer)

    yield make
    for tracer in made:
        tracer.shutdown()


def event(**extra: Any) -> bytes:
    return orjson.dumps({**LIGHTROOM, "recipient_client_id": CLIENT_ID, **extra})


def trace_id(span: ReadableSpan) -> str:
    assert span.context is not None
    return format(span.context.trace_id, "032x")


async def test_a_request_is_a_server_span_continuing_the_incoming_trace(
    traced: Callable[..., Awaitable[Traced]],
) -> None:
    bridge = await traced()
    assert await bridge.post(event(), traceparent=PARENT, tracestate="vendor=42") == 200
    spans = bridge.by_name()
    assert set(spans) == {"POST /webhook", "verify", "route", "publish"}
    server = spans["POST /webhook"]
    assert server.kind == SpanKind.SERVER
    assert trace_id(server) == TRACE_ID
    assert server.parent is not None
    assert format(server.parent.span_id, "016x") == "00f067aa0ba902b7"
    assert server.attributes is not None
    assert server.attributes["http.response.status_code"] == 200
    assert server.attributes["events_bridge.outcome"] == "published"
    assert server.attributes["events_bridge.event_code"] == "lightroom-job-status"
    assert server.context is not None
    for step in ("verify", "route", "publish"):  # children of the request, in the same trace
        parent = spans[step].parent
        assert parent is not None
        assert parent.span_id == server.context.span_id
    # The message carries the request span's context, not the caller's: consumers continue ours.
    (message,) = bridge.publisher.published
    ours = f"00-{TRACE_ID}-{format(server.context.span_id, '016x')}-01"
    assert message.headers["traceparent"] == ours
    assert message.headers["tracestate"] == "vendor=42"


async def test_without_a_traceparent_a_trace_starts_here_and_reaches_every_message(
    traced: Callable[..., Awaitable[Traced]],
) -> None:
    bridge = await traced()
    batch = orjson.dumps([orjson.loads(event(event_id=f"b{i}")) for i in range(3)])
    assert await bridge.post(batch) == 200
    server = bridge.by_name()["POST /webhook"]
    assert server.parent is None
    assert server.context is not None
    parents = {m.headers["traceparent"][:-3] for m in bridge.publisher.published}
    assert parents == {f"00-{trace_id(server)}-{format(server.context.span_id, '016x')}"}
    # sampled (01), and, for a trace id made here, random (02: W3C Trace Context level 2)
    assert bridge.publisher.published[0].headers["traceparent"][-3:] == "-03"
    assert "tracestate" not in bridge.publisher.published[0].headers


async def test_an_unsampled_request_records_nothing_and_passes_the_decision_on(
    traced: Callable[..., Awaitable[Traced]],
) -> None:
    bridge = await traced(ParentBased(ALWAYS_OFF))
    assert await bridge.post(event()) == 200
    unsampled = f"00-{TRACE_ID}-00f067aa0ba902b7-00"  # the caller did not sample it either
    assert await bridge.post(event(event_id="second"), traceparent=unsampled) == 200
    assert bridge.spans.get_finished_spans() == ()
    first, second = (m.headers["traceparent"] for m in bridge.publisher.published)
    # A trace id of our own, and the caller's; neither sampled (flag bit 0), so consumers
    # following their parent need not record either.
    assert not int(first.rsplit("-", 1)[1], 16) & 1
    assert second.startswith(f"00-{TRACE_ID}-")
    assert not int(second.rsplit("-", 1)[1], 16) & 1


async def test_a_forged_request_is_a_401_span_without_a_traceback(
    traced: Callable[..., Awaitable[Traced]],
) -> None:
    bridge = await traced()
    body = event()
    sent = bridge.signer.headers(event(event_id="other"))  # the signature of another body
    async with bridge.client.post("/webhook", data=body, headers=sent) as response:
        assert response.status == 401
    spans = bridge.by_name()
    assert set(spans) == {"POST /webhook", "verify"}
    server, verify = spans["POST /webhook"], spans["verify"]
    assert server.attributes is not None
    assert server.attributes["http.response.status_code"] == 401
    assert server.status.status_code == StatusCode.UNSET  # a 4xx is the caller's, not ours
    assert verify.attributes is not None
    assert verify.attributes["events_bridge.refusal"] == "signature_invalid"
    assert verify.events == ()  # no exception event: a flood of forgeries stays cheap


async def test_the_broker_away_gives_an_outbox_span_under_publish(
    traced: Callable[..., Awaitable[Traced]], tmp_path: Any
) -> None:
    bridge = await traced(outbox=OutboxConfig(dir=str(tmp_path / "outbox"), mode="fallback"))
    bridge.publisher.fail = True
    assert await bridge.post(event(), traceparent=PARENT) == 200
    spans = bridge.by_name()
    assert set(spans) == {"POST /webhook", "verify", "route", "publish", "outbox"}
    assert spans["publish"].context is not None
    assert spans["outbox"].parent is not None
    assert spans["outbox"].parent.span_id == spans["publish"].context.span_id
    assert spans["outbox"].attributes is not None
    assert spans["outbox"].attributes["events_bridge.outcome"] == "stored"
    assert spans["POST /webhook"].attributes is not None
    assert spans["POST /webhook"].attributes["events_bridge.outcome"] == "stored"
    bridge.publisher.fail = False  # the broker back: the outbox drains at once on shutdown


async def test_a_503_marks_the_request_span_as_an_error(
    traced: Callable[..., Awaitable[Traced]],
) -> None:
    bridge = await traced()  # outbox off: the broker away is a 503
    bridge.publisher.fail = True
    assert await bridge.post(event()) == 503
    server = bridge.by_name()["POST /webhook"]
    assert server.status.status_code == StatusCode.ERROR
    assert server.attributes is not None
    assert server.attributes["events_bridge.outcome"] == "not_connected"


class Collector:
    """An OTLP/HTTP trace receiver on loopback, as an OpenTelemetry Collector answers."""

    def __init__(self) -> None:
        self.spans: list[Any] = []

    async def handle(self, request: web.Request) -> web.Response:
        export = ExportTraceServiceRequest()
        export.ParseFromString(await request.read())
        for resource in export.resource_spans:
            for scope in resource.scope_spans:
                self.spans.extend(scope.spans)
        return web.Response(
            body=ExportTraceServiceResponse().SerializeToString(),
            content_type="application/x-protobuf",
        )


async def delete_queue(amqp_url: str, name: str) -> None:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        await channel.queue_delete(name)


async def test_one_trace_id_from_the_incoming_traceparent_to_the_consumer(
    rig: Rig, aiohttp_server: Callable[[web.Application], Awaitable[TestServer]]
) -> None:
    collector = Collector()
    app = web.Application()
    app.router.add_post("/v1/traces", collector.handle)
    otlp = await aiohttp_server(app)
    daemon = await rig.start(
        OTEL_EXPORTER_OTLP_ENDPOINT=str(otlp.make_url("")).rstrip("/"),
        OTEL_BSP_SCHEDULE_DELAY="50",
        OTEL_SERVICE_NAME="bridge-under-test",
    )
    event_id = f"traced-{uuid.uuid4().hex[:8]}"
    status, _ = await rig.post(body_for(event_id), {"traceparent": PARENT})
    assert status == 200
    assert daemon.wait_log("tracing_enabled")["service"] == "bridge-under-test"

    # The consumer helper, with its own in-memory spans, reads the message from the broker.
    provider, exporter = in_memory()
    handled: list[ReceivedEvent] = []

    async def handle(received: ReceivedEvent) -> None:
        handled.append(received)

    queue = f"{rig.prefix}.all"
    consumer = Consumer(rig.amqp_url, queue, handle, tracer_provider=provider)
    await consumer.start()
    try:
        for _ in range(100):
            if handled:
                break
            await asyncio.sleep(0.05)
    finally:
        await consumer.close()
        await delete_queue(rig.amqp_url, consumer.retry_queue_name)
    assert [e.event_id for e in handled] == [event_id]

    # The daemon exported its spans over OTLP/HTTP, all in the caller's trace.
    for _ in range(100):
        if {s.name for s in collector.spans} >= {"POST /webhook", "verify", "route", "publish"}:
            break
        await asyncio.sleep(0.05)
    exported = {s.name: s for s in collector.spans}
    assert {s.trace_id.hex() for s in collector.spans} == {TRACE_ID}
    server = exported["POST /webhook"]
    assert server.parent_span_id.hex() == "00f067aa0ba902b7"

    # The consumer's span: the same trace, a child of the bridge's request span.
    (span,) = exporter.get_finished_spans()
    assert span.kind == SpanKind.CONSUMER
    assert trace_id(span) == TRACE_ID
    assert span.parent is not None
    assert format(span.parent.span_id, "016x") == server.span_id.hex()
    assert handled[0].headers["traceparent"] == f"00-{TRACE_ID}-{server.span_id.hex()}-01"
    provider.shutdown()
    code, _ = daemon.stop()
    assert code == 0


async def test_traces_off_leave_the_trace_headers_as_they_came(
    traced: Callable[..., Awaitable[Traced]],
) -> None:
    bridge = await traced(traces=False)
    assert await bridge.post(event(), traceparent="caller's own words", tracestate="a=b") == 200
    (message,) = bridge.publisher.published
    assert message.headers["traceparent"] == "caller's own words"  # copied as ever (SPEC §5)
    assert "tracestate" not in message.headers
    assert bridge.spans.get_finished_spans() == ()


@pytest.mark.parametrize(
    ("traceparent", "tracestate"),
    [
        ("00-" + "a" * 32 + "-" + "b" * 16 + "-01" + "x" * 600, "k=v"),  # too long
        ("zz-not-a-traceparent", "k=v"),
        ("00-" + "0" * 32 + "-" + "b" * 16 + "-01", "k=v"),  # the invalid all-zero trace id
        (PARENT, "m=" + "x" * 4000),  # a tracestate over 512 characters
        (PARENT, "ATTACKER CONTENT, not=a valid member"),
    ],
)
async def test_hostile_trace_headers_start_a_trace_of_our_own_and_log_nothing(
    traced: Callable[..., Awaitable[Traced]],
    caplog: pytest.LogCaptureFixture,
    traceparent: str,
    tracestate: str,
) -> None:
    bridge = await traced()
    with caplog.at_level(logging.DEBUG, logger="opentelemetry"):
        status = await bridge.post(event(), traceparent=traceparent, tracestate=tracestate)
    assert status == 200
    assert [r for r in caplog.records if r.name.startswith("opentelemetry")] == []
    server = bridge.by_name()["POST /webhook"]
    (message,) = bridge.publisher.published
    if traceparent == PARENT:  # a valid parent: continued, its bad or huge state is not
        assert trace_id(server) == TRACE_ID
    else:
        assert server.parent is None
        assert trace_id(server) != TRACE_ID
    assert len(message.headers.get("tracestate", "")) <= 512
    assert "ATTACKER" not in message.headers.get("tracestate", "")


async def test_a_failing_handler_makes_the_consumer_span_an_error(amqp_url: str) -> None:
    provider, exporter = in_memory()
    queue = f"test.traced-{uuid.uuid4().hex[:8]}"
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        await channel.declare_queue(queue, durable=True)  # RabbitMQ 4 deprecates transient ones
        await channel.default_exchange.publish(
            aio_pika.Message(
                orjson.dumps({**LIGHTROOM, "event_id": "fails"}),
                message_id="fails",
                headers={"traceparent": PARENT},
            ),
            routing_key=queue,
        )

        async def handle(received: ReceivedEvent) -> None:
            raise RuntimeError("the handler's own bug")

        consumer = Consumer(amqp_url, queue, handle, max_attempts=1, tracer_provider=provider)
        await consumer.start()
        try:
            for _ in range(100):
                if exporter.get_finished_spans():
                    break
                await asyncio.sleep(0.05)
        finally:
            await consumer.close()
            await channel.queue_delete(queue)
            await channel.queue_delete(consumer.retry_queue_name)
    (span,) = exporter.get_finished_spans()
    assert trace_id(span) == TRACE_ID
    assert span.status.status_code == StatusCode.ERROR
    assert span.attributes is not None
    assert span.attributes["events_bridge.outcome"] == "dead_lettered"
    assert [e.name for e in span.events] == ["exception"]
    provider.shutdown()
