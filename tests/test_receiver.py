"""The HTTP edge with a fake publisher: every answer of SPEC §3, signatures against a key server."""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from structlog.testing import capture_logs

from bridge.app import create_app
from bridge.config import Config, Registration
from bridge.message import Outbound
from bridge.rules import Match
from tests.helpers import (
    CLIENT_ID,
    EVENTS,
    KEY_PATH,
    SAMPLES,
    FakePublisher,
    KeyServer,
    SigningKey,
    make_config,
)

Client = TestClient[web.Request, web.Application]
LIGHTROOM = orjson.loads((EVENTS / "imaging_lightroom-job-status_succeeded.json").read_bytes())


def event_body(**extra: Any) -> bytes:
    return orjson.dumps({**LIGHTROOM, "recipient_client_id": CLIENT_ID, **extra})


@pytest.fixture(scope="module")
def signer() -> SigningKey:
    return SigningKey.generate()


@pytest.fixture
async def keys(
    aiohttp_server: Callable[[web.Application], Awaitable[TestServer]], signer: SigningKey
) -> tuple[KeyServer, str]:
    server = KeyServer()
    server.keys[KEY_PATH] = signer.public_pem
    running = await aiohttp_server(server.app())
    return server, str(running.make_url("")).rstrip("/")


@dataclasses.dataclass
class Bridge:
    client: Client
    publisher: FakePublisher
    keys: KeyServer
    signer: SigningKey

    async def post(self, body: bytes, **headers: str) -> Any:
        return await self.client.post(
            "/webhook", data=body, headers=self.signer.headers(body, **headers)
        )


@pytest.fixture
def make_bridge(
    aiohttp_client: Callable[[web.Application], Awaitable[Client]],
    keys: tuple[KeyServer, str],
    signer: SigningKey,
) -> Callable[..., Awaitable[Bridge]]:
    async def make(config: Config | None = None, **server: Any) -> Bridge:
        config = config or make_config(key_base_url=keys[1], **server)
        publisher = FakePublisher()
        client = await aiohttp_client(create_app(config, publisher))
        return Bridge(client, publisher, keys[0], signer)

    return make


@pytest.fixture
async def bridge(make_bridge: Callable[..., Awaitable[Bridge]]) -> Bridge:
    return await make_bridge()


async def test_challenge_is_echoed_as_json(bridge: Bridge) -> None:
    response = await bridge.client.get("/webhook", params={"challenge": "8ec8d794-e0ab-42df"})
    assert response.status == 200
    assert response.content_type == "application/json"
    assert await response.json() == {"challenge": "8ec8d794-e0ab-42df"}
    assert response.headers["X-Content-Type-Options"] == "nosniff"


@pytest.mark.parametrize("value", ["<script>alert(1)</script>", '"quoted"', "a b", "x" * 300, ""])
async def test_hostile_challenge_is_refused(bridge: Bridge, value: str) -> None:
    response = await bridge.client.get("/webhook", params={"challenge": value})
    assert response.status == 400
    assert "<script>" not in await response.text()


async def test_get_without_challenge_is_a_400(bridge: Bridge) -> None:
    assert (await bridge.client.get("/webhook")).status == 400


async def test_signed_event_is_published_with_spec_properties(bridge: Bridge) -> None:
    body = event_body()
    response = await bridge.post(
        body, **{"x-adobe-provider": "p", "x-adobe-retry-count": "2", "traceparent": "00-ab-cd-01"}
    )
    assert response.status == 200
    assert await response.json() == {"status": "published", "events": 1, "messages": 1}
    (message,) = bridge.publisher.published
    assert message.routing_key == "lightroom-job-status.succeeded"
    assert message.body == body
    assert message.message_id == "7b59cc70-88d7-4895-b204-87f5350a0cce"
    assert message.type == "lightroom-job-status"
    assert message.headers["job-id"] == "eb4a9211-eb8a-4e88-b853-b9c08ba47427"
    assert message.headers["job-status"] == "succeeded"
    assert message.headers["adobe-provider"] == "p"
    assert message.headers["adobe-retry-count"] == "2"
    assert message.headers["traceparent"] == "00-ab-cd-01"
    assert message.headers["registration"] == "default"


@pytest.mark.parametrize(
    "content_type",
    [
        "application/json",
        "application/json; charset=utf-8",
        "application/cloudevents+json",
        "application/cloudevents-batch+json",
        "application/vnd.adobe.events+json",
    ],
)
async def test_json_content_types_are_accepted(bridge: Bridge, content_type: str) -> None:
    response = await bridge.post(event_body(), **{"content-type": content_type})
    assert response.status == 200


@pytest.mark.parametrize("content_type", ["text/plain", "multipart/form-data", ""])
async def test_other_content_types_get_415(bridge: Bridge, content_type: str) -> None:
    body = event_body()
    headers = bridge.signer.headers(body)
    if content_type:
        headers["content-type"] = content_type
    else:
        del headers["content-type"]
    response = await bridge.client.post("/webhook", data=body, headers=headers)
    assert response.status == 415
    assert bridge.publisher.published == []


@pytest.mark.parametrize("method", ["PUT", "DELETE", "PATCH"])
async def test_other_methods_get_405(bridge: Bridge, method: str) -> None:
    assert (await bridge.client.request(method, "/webhook")).status == 405


async def test_body_over_the_limit_gets_413(make_bridge: Callable[..., Awaitable[Bridge]]) -> None:
    bridge = await make_bridge(max_body_bytes=2048)
    body = event_body(padding="x" * 4096)
    response = await bridge.post(body)
    assert response.status == 413

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(8):
            yield b" " * 1024

    headers = bridge.signer.headers(b"")
    response = await bridge.client.post("/webhook", data=chunks(), headers=headers)
    assert response.status == 413
    assert bridge.publisher.published == []


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (
            {"x-adobe-digital-signature-1": "", "x-adobe-digital-signature-2": ""},
            "signature_missing",
        ),
        (
            {"x-adobe-public-key1-path": "//evil/x.pem", "x-adobe-public-key2-path": "/../x"},
            "signature_missing",
        ),
        (
            {
                "x-adobe-digital-signature-1": "c29tZSByYW5kb20gU3RyaW5n",
                "x-adobe-digital-signature-2": "c29tZSByYW5kb20gU3RyaW5n",
            },
            "signature_invalid",
        ),
        (
            {
                "x-adobe-public-key1-path": "/prod/keys/pub-key-unknown.pem",
                "x-adobe-public-key2-path": "/prod/keys/pub-key-unknown.pem",
            },
            "signature_invalid",
        ),
    ],
)
async def test_bad_signatures_get_401(bridge: Bridge, change: dict[str, str], reason: str) -> None:
    body = event_body()
    headers = {**bridge.signer.headers(body), **change}
    response = await bridge.client.post("/webhook", data=body, headers=headers)
    assert response.status == 401
    assert (await response.json())["error"] == reason
    assert bridge.publisher.published == []
    assert all(hit.startswith("/prod/keys/") for hit in bridge.keys.hits)


async def test_tampered_body_gets_401(bridge: Bridge) -> None:
    body = event_body()
    headers = bridge.signer.headers(body)
    tampered = body.replace(b"succeeded", b"failed")
    response = await bridge.client.post("/webhook", data=tampered, headers=headers)
    assert response.status == 401
    assert bridge.publisher.published == []


async def test_either_signature_suffices(bridge: Bridge) -> None:
    body = event_body()
    response = await bridge.post(body, **{"x-adobe-digital-signature-1": "AAAA"})
    assert response.status == 200


async def test_wrong_recipient_gets_403(bridge: Bridge) -> None:
    body = orjson.dumps({**LIGHTROOM, "recipientclientid": "someone-else"})
    response = await bridge.post(body)
    assert response.status == 403
    assert (await response.json())["error"] == "recipient_mismatch"


async def test_missing_recipient_gets_403(bridge: Bridge) -> None:
    response = await bridge.post(orjson.dumps(LIGHTROOM))
    assert response.status == 403


async def test_batch_with_one_stranger_is_refused_whole(bridge: Bridge) -> None:
    good = {**LIGHTROOM, "recipientclientid": CLIENT_ID}
    stranger = {**LIGHTROOM, "event_id": "other", "recipientclientid": "x"}
    response = await bridge.post(orjson.dumps([good, stranger]))
    assert response.status == 403
    assert "batch element 1" in (await response.json())["detail"]
    assert bridge.publisher.published == []


async def test_batch_publishes_one_message_per_event(bridge: Bridge) -> None:
    events = [{**LIGHTROOM, "event_id": f"e{i}", "recipientclientid": CLIENT_ID} for i in range(3)]
    response = await bridge.post(orjson.dumps(events))
    assert response.status == 200
    assert [m.message_id for m in bridge.publisher.published] == ["e0", "e1", "e2"]
    assert all(
        orjson.loads(m.body) == e for m, e in zip(bridge.publisher.published, events, strict=True)
    )


async def test_ims_org_allow_list(
    make_bridge: Callable[..., Awaitable[Bridge]], keys: tuple[KeyServer, str]
) -> None:
    config = make_config(key_base_url=keys[1])
    registration = Registration("default", "/webhook", (CLIENT_ID,), ("ORG1@AdobeOrg",))
    bridge = await make_bridge(dataclasses.replace(config, registrations=(registration,)))
    assert (await bridge.post(event_body())).status == 403
    header = {**LIGHTROOM["event"]["header"], "imsOrgId": "ORG1@AdobeOrg"}
    body = event_body(event={**LIGHTROOM["event"], "header": header})
    assert (await bridge.post(body)).status == 200


@pytest.mark.parametrize("body", [b"{not json", b"[]", b'"x"', b"\xff\xfe", b""])
async def test_signed_garbage_gets_400(bridge: Bridge, body: bytes) -> None:
    response = await bridge.post(body)
    assert response.status == 400
    assert bridge.publisher.published == []


def validation_body() -> bytes:
    """Adobe's published validationUrl POST, its <guid> placeholders filled in as Adobe does."""
    raw = (SAMPLES / "control" / "async_validation_post_body.json").read_bytes()
    return raw.replace(b"<guid1>", str(uuid.uuid4()).encode()).replace(
        b"<guid2>", str(uuid.uuid4()).encode()
    )


async def test_unsigned_validation_url_is_logged_not_published(bridge: Bridge) -> None:
    body = validation_body()
    response = await bridge.client.post(
        "/webhook", data=body, headers={"content-type": "application/json"}
    )
    assert response.status == 200
    assert (await response.json())["status"] == "validation_url_logged"
    assert bridge.publisher.published == []
    metrics = await (await bridge.client.get("/metrics")).text()
    assert 'bridge_validation_url_posts_total{registration="default"}' in metrics


async def test_unsigned_event_gets_401(bridge: Bridge) -> None:
    response = await bridge.client.post(
        "/webhook", data=event_body(), headers={"content-type": "application/json"}
    )
    assert response.status == 401


async def test_broker_down_gives_503_with_retry_after(bridge: Bridge) -> None:
    bridge.publisher.fail = True
    response = await bridge.post(event_body())
    assert response.status == 503
    assert int(response.headers["Retry-After"]) > 0


async def test_a_bug_on_the_road_is_a_500_with_its_traceback_not_a_retryable_503(
    bridge: Bridge, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(messages: Sequence[Outbound], deadline: float | None = None) -> None:
        raise RuntimeError("a bug, not the broker")

    monkeypatch.setattr(bridge.publisher, "publish", broken)
    with capture_logs() as logs:
        response = await bridge.post(event_body())
    assert response.status == 500
    assert "Retry-After" not in response.headers
    assert (await response.json())["error"] == "internal_error"
    (crash,) = [e for e in logs if e["event"] == "request_crashed"]
    assert crash["log_level"] == "error"
    assert crash.get("exc_info") is True


async def test_an_answer_past_the_deadline_still_logs_what_it_knew(
    make_bridge: Callable[..., Awaitable[Bridge]], monkeypatch: pytest.MonkeyPatch
) -> None:
    bridge = await make_bridge(answer_deadline=1.0)

    async def stuck(messages: Sequence[Outbound], deadline: float | None = None) -> None:
        await asyncio.sleep(5)

    monkeypatch.setattr(bridge.publisher, "publish", stuck)
    with capture_logs() as logs:
        response = await bridge.post(event_body(event_id="late-1"))
    assert response.status == 503
    assert (await response.json())["error"] == "deadline"
    (line,) = [e for e in logs if e["event"] == "webhook_handled"]
    assert line["event_id"] == "late-1"
    assert line["event_code"] == "lightroom-job-status"
    assert "routing_key" in line


async def test_readiness_follows_the_publisher(bridge: Bridge) -> None:
    assert (await bridge.client.get("/healthz")).status == 200
    assert (await bridge.client.get("/readyz")).status == 200
    bridge.publisher.ready = False
    assert (await bridge.client.get("/readyz")).status == 503
    assert (await bridge.client.get("/healthz")).status == 200


@pytest.mark.parametrize(
    ("behaviour", "limit"), [("error", 2.0), ("hang", 2.5), ("redirect", 2.0), ("huge", 2.0)]
)
async def test_key_host_trouble_is_a_fast_503(bridge: Bridge, behaviour: str, limit: float) -> None:
    bridge.keys.behaviour[KEY_PATH] = behaviour
    started = time.monotonic()
    response = await bridge.post(event_body())
    assert response.status == 503
    assert time.monotonic() - started < limit
    assert (await response.json())["error"] == "key_unavailable"
    assert bridge.publisher.published == []
    # The cache is not poisoned: once the host behaves, the same key works.
    del bridge.keys.behaviour[KEY_PATH]
    assert (await bridge.post(event_body())).status == 200


async def test_concurrent_requests_fetch_a_key_once(bridge: Bridge) -> None:
    responses = await asyncio.gather(*(bridge.post(event_body()) for _ in range(20)))
    assert [r.status for r in responses] == [200] * 20
    assert bridge.keys.hits == [KEY_PATH]


class SlowPublisher(FakePublisher):
    async def publish(self, messages: Sequence[Outbound], deadline: float | None = None) -> None:
        await asyncio.sleep(60)


async def test_every_answer_comes_within_the_deadline(
    aiohttp_client: Callable[[web.Application], Awaitable[Client]],
    keys: tuple[KeyServer, str],
    signer: SigningKey,
) -> None:
    config = make_config(key_base_url=keys[1], answer_deadline=1.0)
    client = await aiohttp_client(create_app(config, SlowPublisher()))
    body = event_body()
    started = time.monotonic()
    response = await client.post("/webhook", data=body, headers=signer.headers(body))
    assert response.status == 503
    assert (await response.json())["error"] == "deadline"
    assert time.monotonic() - started < 2.0


async def test_a_body_that_never_arrives_gets_503(
    make_bridge: Callable[..., Awaitable[Bridge]],
) -> None:
    bridge = await make_bridge(answer_deadline=1.0)
    server = bridge.client.server
    reader, writer = await asyncio.open_connection(server.host, server.port)
    writer.write(
        b"POST /webhook HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b'Content-Length: 100\r\n\r\n{"partial":'
    )
    await writer.drain()
    started = time.monotonic()
    status_line = await asyncio.wait_for(reader.readline(), 5)
    assert status_line.split()[1] == b"503"  # Adobe retries 5xx, never 408
    assert time.monotonic() - started < 2.0
    writer.close()


async def test_metrics_are_prometheus_text(bridge: Bridge) -> None:
    await bridge.post(event_body())
    response = await bridge.client.get("/metrics")
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    text = await response.text()
    assert 'bridge_requests_total{outcome="published",registration="default",status="200"}' in text


async def test_too_many_in_flight_gets_429(
    aiohttp_client: Callable[[web.Application], Awaitable[Client]],
    keys: tuple[KeyServer, str],
    signer: SigningKey,
) -> None:
    config = make_config(key_base_url=keys[1], max_in_flight=2, answer_deadline=1.0)
    client = await aiohttp_client(create_app(config, SlowPublisher()))
    body = event_body()
    responses = await asyncio.gather(
        *(client.post("/webhook", data=body, headers=signer.headers(body)) for _ in range(4))
    )
    statuses = sorted(r.status for r in responses)
    assert statuses == [429, 429, 503, 503]
    limited = next(r for r in responses if r.status == 429)
    assert limited.headers["Retry-After"] == "1"


async def raw_request(bridge: Bridge, head: bytes, body: bytes) -> bytes:
    server = bridge.client.server
    reader, writer = await asyncio.open_connection(server.host, server.port)
    writer.write(head + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    await writer.drain()
    status_line = await asyncio.wait_for(reader.readline(), 5)
    writer.close()
    return status_line


async def test_header_bytes_that_are_not_utf8_never_cause_a_500(bridge: Bridge) -> None:
    body = event_body()
    head = b"POST /webhook HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    for name, value in bridge.signer.headers(body).items():
        if name != "content-type":
            head += name.encode() + b": " + value.encode() + b"\r\n"
    head += b"x-adobe-provider: \xff\xfe\r\nx-adobe-delivery-id: \xc3\x28\r\n"
    assert (await raw_request(bridge, head, body)).split()[1] == b"200"
    (message,) = bridge.publisher.published
    assert "adobe-provider" not in message.headers


@pytest.mark.parametrize(
    ("code", "event_id"),
    [
        ("c" * 200, "short-id"),
        ("é" * 300, "i" * 256),
        ("code", "😀" * 100),
        ("x" * 9000, "y" * 9000),
    ],
)
async def test_a_long_event_code_or_id_is_bounded_and_published(
    bridge: Bridge, code: str, event_id: str
) -> None:
    """Adobe never retries a 4xx: a genuine event with an odd code or id is published, its
    properties bounded (type cut, message_id a digest), the headers keeping what fits."""
    header = {**LIGHTROOM["event"]["header"], "eventCode": code}
    body = event_body(event={**LIGHTROOM["event"], "header": header}, event_id=event_id)
    response = await bridge.post(body)
    assert response.status == 200, await response.text()
    (message,) = bridge.publisher.published
    assert message.body == body
    assert len(message.type.encode()) <= 255
    assert code.startswith(message.type)
    assert len(message.routing_key.encode()) <= 255
    assert len(message.message_id.encode()) <= 255
    if len(event_id.encode()) > 255:
        assert message.message_id.startswith("sha256:")
    else:
        assert message.message_id == event_id
    for name, value in (("event-code", code), ("event-id", event_id)):
        if len(value.encode()) <= 4096:
            assert message.headers[name] == value
        else:
            assert name in message.headers["bridge-omitted"].split(",")


@pytest.mark.parametrize(
    "url", ["http://csm.adobe.io/x", "https://evil.example/csm.adobe.io", "https://adobe.io.evil/x"]
)
async def test_validation_url_that_is_not_adobes_is_refused(bridge: Bridge, url: str) -> None:
    response = await bridge.client.post(
        "/webhook",
        data=orjson.dumps({"validationUrl": url}),
        headers={"content-type": "application/json"},
    )
    assert response.status == 400
    assert (await response.json())["error"] == "validation_url_not_adobe"


async def test_made_up_key_paths_cannot_evict_the_real_key(bridge: Bridge) -> None:
    assert (await bridge.post(event_body())).status == 200
    body = event_body()
    for i in range(300):
        path = f"/prod/keys/pub-key-junk{i}.pem"
        headers = bridge.signer.headers(
            body, **{"x-adobe-public-key1-path": path, "x-adobe-public-key2-path": path}
        )
        response = await bridge.client.post("/webhook", data=body, headers=headers)
        # 401 (no such key), or 503 once made-up paths come faster than they may be fetched
        assert response.status in (401, 503)
    assert len(bridge.keys.hits) < 30  # the host was asked for a few of them, not 300
    hits = len(bridge.keys.hits)
    assert (await bridge.post(event_body())).status == 200
    assert len(bridge.keys.hits) == hits  # served from the cache, not fetched again


async def test_each_registration_has_its_own_path_client_ids_and_routes(
    make_bridge: Callable[..., Awaitable[Bridge]], keys: tuple[KeyServer, str]
) -> None:
    from bridge.rules import Route, TargetSpec

    base = make_config(key_base_url=keys[1])
    exchange = base.broker.exchange
    drop_running = Route("quiet", Match(status=("running",)), action="drop")
    own = (drop_running, Route("b-only", targets=(TargetSpec(exchange, "b.{status}"),)))
    config = dataclasses.replace(
        base,
        registrations=(
            Registration("a", "/a", ("client-a",)),
            Registration("b", "/b", ("client-b",), routes=own),
        ),
    )
    bridge = await make_bridge(config)

    async def post(path: str, client: str, status: str = "succeeded") -> int:
        body = event_body(
            event_id=f"{path}-{client}-{status}",
            recipient_client_id=client,
            event={
                **LIGHTROOM["event"],
                "body": {"jobId": "j", "outputs": [{"status": status}]},
            },
        )
        response = await bridge.client.post(path, data=body, headers=bridge.signer.headers(body))
        return response.status

    assert await post("/a", "client-a") == 200
    assert await post("/b", "client-a") == 403  # a's client id is not b's
    assert await post("/b", "client-b") == 200
    assert [m.routing_key for m in bridge.publisher.published] == [
        "lightroom-job-status.succeeded",
        "b.succeeded",
    ]
    assert [m.headers["registration"] for m in bridge.publisher.published] == ["a", "b"]
    assert await post("/b", "client-b", "running") == 200  # dropped by b's own rule
    assert len(bridge.publisher.published) == 2
    metrics = await (await bridge.client.get("/metrics")).text()
    assert 'bridge_events_dropped_total{rule="quiet"}' in metrics


async def test_reload_swaps_rules_for_the_next_requests(
    make_bridge: Callable[..., Awaitable[Bridge]], keys: tuple[KeyServer, str]
) -> None:
    from bridge.app import RECEIVER
    from bridge.rules import Route

    config = make_config(key_base_url=keys[1])
    bridge = await make_bridge(config)
    assert (await bridge.post(event_body(event_id="before"))).status == 200
    receiver = bridge.client.app[RECEIVER]
    notes = receiver.reload(dataclasses.replace(config, routes=(Route("all", action="drop"),)))
    assert notes == []
    response = await bridge.post(event_body(event_id="after"))
    assert (await response.json())["status"] == "dropped"
    assert len(bridge.publisher.published) == 1
    moved = dataclasses.replace(config, registrations=(Registration("default", "/other", ("x",)),))
    assert receiver.reload(moved) == [
        "registrations added, removed or moved to another path: restart"
    ]


# (The daemon reads bodies undecoded; aiohttp's test server decodes gzip and deflate itself and
# refuses encodings it has no codec for at parse time: tests/test_serve_hostile.py has those.)
@pytest.mark.parametrize("encoding", ["gzip", "deflate", "GZIP", "identity, gzip"])
async def test_an_encoded_body_is_refused_as_it_is_not_what_was_signed(
    bridge: Bridge, encoding: str
) -> None:
    response = await bridge.post(b"\x1f\x8b not gzip at all", **{"content-encoding": encoding})
    assert response.status == 415
    assert (await response.json())["error"] == "unsupported_content_encoding"


@pytest.mark.parametrize(
    "headers",
    [
        {},  # no signature at all, and a body too large for a validationUrl POST
        {"x-adobe-digital-signature-1": "abc="},  # some, not all four
        {
            "x-adobe-digital-signature-1": "!!",
            "x-adobe-digital-signature-2": "!!",
            "x-adobe-public-key1-path": "/prod/keys/pub-key-a.pem",
            "x-adobe-public-key2-path": "/etc/passwd",
        },
    ],
)
async def test_a_request_that_cannot_verify_is_refused_before_its_body_is_read(
    bridge: Bridge, headers: dict[str, str]
) -> None:
    body = event_body(pad="x" * 10_000)
    response = await bridge.client.post(
        "/webhook", data=body, headers={"content-type": "application/json", **headers}
    )
    assert response.status == 401
    assert response.headers.get("Connection", "").lower() == "close"  # the body was not read
    assert bridge.publisher.published == []


async def test_a_batch_over_max_batch_events_is_a_413(
    make_bridge: Callable[..., Awaitable[Bridge]],
) -> None:
    bridge = await make_bridge(max_batch_events=20)
    events = [orjson.loads(event_body(event_id=f"b{i}")) for i in range(21)]
    response = await bridge.post(orjson.dumps(events))
    assert response.status == 413
    assert (await response.json())["error"] == "too_many_events"
    assert (await bridge.post(orjson.dumps(events[:20]))).status == 200


async def test_the_routers_own_answers_are_json_too(bridge: Bridge) -> None:
    missing = await bridge.client.get("/nowhere")
    assert missing.status == 404
    assert (await missing.json())["error"] == "not_found"
    wrong = await bridge.client.delete("/webhook")
    assert wrong.status == 405
    assert (await wrong.json())["error"] == "method_not_allowed"
    assert "POST" in wrong.headers["Allow"]
