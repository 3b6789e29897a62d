"""Bad input: never a 5xx for the sender's mistake, never a crash; properties of the pure core."""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.adobe.envelope import parse_delivery
from bridge.adobe.signature import signed_pairs
from bridge.app import create_app
from bridge.errors import BadRequest
from tests.helpers import CLIENT_ID, KEY_PATH, FakePublisher, KeyServer, SigningKey, make_config

Client = TestClient[web.Request, web.Application]


@given(st.binary(max_size=4096))
@settings(max_examples=300)
def test_parse_delivery_only_ever_refuses_with_a_400(raw: bytes) -> None:
    try:
        delivery = parse_delivery(raw, "hdr-id", "hdr.code")
    except BadRequest:
        return  # a 400, by the class
    for event in delivery.events:
        assert event.event_id == expected_id(event.document, event.body, delivery.batch)
        assert len(event.event_code.encode()) <= 190


def expected_id(document: dict[str, Any], body: bytes, batch: bool) -> str:
    """The event id the envelope's rules give: the body's own, the header's on a single
    delivery, else the digest of the event's bytes."""
    for key in ("eventid", "event_id"):
        value = document.get(key)
        if isinstance(value, str) and value.strip():
            try:
                value.encode()
            except UnicodeEncodeError:
                continue
            return value
    return "hdr-id" if not batch else "sha256:" + hashlib.sha256(body).hexdigest()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=12), children, max_size=5)
    ),
    max_leaves=30,
)


@given(st.lists(st.dictionaries(st.text(max_size=12), json_values, max_size=6), max_size=5))
def test_any_json_object_or_batch_parses_or_is_a_400(items: list[dict[str, object]]) -> None:
    import json

    raw = json.dumps(items if len(items) != 1 else items[0]).encode()
    try:
        delivery = parse_delivery(raw)
    except BadRequest:
        return
    parsed = json.loads(raw)
    documents = parsed if isinstance(parsed, list) else [parsed]
    assert len(delivery.events) == len(documents)
    for event, document in zip(delivery.events, documents, strict=True):
        # Each event keeps its own bytes, verbatim: the whole body, or its element's slice.
        assert event.body in raw
        assert json.loads(event.body) == document
    if not delivery.batch:
        assert delivery.events[0].body == raw


@given(
    st.dictionaries(
        st.sampled_from(
            [
                "x-adobe-digital-signature-1",
                "x-adobe-digital-signature-2",
                "x-adobe-public-key1-path",
                "x-adobe-public-key2-path",
            ]
        ),
        st.text(max_size=300),
    )
)
def test_signature_headers_never_crash(headers: dict[str, str]) -> None:
    pairs, problems = signed_pairs(headers)
    assert all(p.key_path.startswith("/prod/keys/pub-key-") for p in pairs)
    assert pairs or problems  # unsigned or not: either a pair to verify, or why not
    assert not (pairs and not any(headers.get(f"x-adobe-digital-signature-{n}") for n in (1, 2)))


@pytest.fixture(scope="module")
def signer() -> SigningKey:
    return SigningKey.generate()


@pytest.fixture
async def bridge(
    aiohttp_server: Callable[[web.Application], Awaitable[TestServer]],
    aiohttp_client: Callable[[web.Application], Awaitable[Client]],
    signer: SigningKey,
) -> tuple[Client, FakePublisher, KeyServer]:
    keys = KeyServer()
    keys.keys[KEY_PATH] = signer.public_pem
    server = await aiohttp_server(keys.app())
    publisher = FakePublisher()
    config = make_config(key_base_url=str(server.make_url("")).rstrip("/"))
    return await aiohttp_client(create_app(config, publisher)), publisher, keys


def event(extra: bytes = b"") -> bytes:
    return (
        b'{"eventid":"e-%s","specversion":"1.0","type":"t","recipientclientid":"'
        % str(abs(hash(extra))).encode()
        + CLIENT_ID.encode()
        + b'"'
        + extra
        + b"}"
    )


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (event(b',"data":' + b"[" * 10 + b"]" * 10), 200),
        (event(b',"data":' + b"[" * 999 + b"]" * 999), 200),
        (event(b',"data":' + b"[" * 100_000 + b"]" * 100_000), 400),
        (event(b',"n":' + b"7" * 5000), 200),
        (event(b',"s":"\\ud800"'), 200),
        (event(b',"dup":1,"dup":2'), 200),
        (event(b',"n":NaN'), 400),
        (b"\xef\xbb\xbf" + event(), 400),
        (event(b',"bad":"\xff"'), 400),
        (b"", 400),
        (b"null", 400),
        (b"[]", 400),
    ],
)
async def test_json_edge_cases_signed(
    bridge: tuple[Client, FakePublisher, KeyServer],
    signer: SigningKey,
    body: bytes,
    expected: int,
) -> None:
    client, publisher, _ = bridge
    response = await client.post("/webhook", data=body, headers=signer.headers(body))
    assert response.status == expected
    if expected == 200:
        (message,) = publisher.published
        assert message.body == body  # published byte-identical, however odd
    else:
        assert publisher.published == []


async def test_a_replayed_delivery_is_published_once(
    bridge: tuple[Client, FakePublisher, KeyServer],
    signer: SigningKey,
) -> None:
    client, publisher, _ = bridge
    body = event(b',"replay":true')
    headers = signer.headers(body)
    statuses = [
        (await client.post("/webhook", data=body, headers=headers)).status for _ in range(3)
    ]
    assert statuses == [200, 200, 200]
    assert len(publisher.published) == 1
    metrics = await (await client.get("/metrics")).text()
    assert "bridge_duplicate_events_total" in metrics


async def test_a_weak_key_from_the_key_host_is_refused_and_not_kept(
    bridge: tuple[Client, FakePublisher, KeyServer],
    signer: SigningKey,
) -> None:
    client, publisher, keys = bridge
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    keys.keys[KEY_PATH] = weak.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    body = event(b',"weak":1')
    assert (await client.post("/webhook", data=body, headers=signer.headers(body))).status == 401
    assert publisher.published == []
    keys.keys[KEY_PATH] = signer.public_pem  # the host serves the right key again
    body = event(b',"weak":2')
    response = await client.post("/webhook", data=body, headers=signer.headers(body))
    assert response.status == 200  # believed at once: a bad key is never remembered
    assert len(publisher.published) == 1
