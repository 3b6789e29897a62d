"""Adobe's published signature vectors, each sent through the HTTP endpoint to a real broker.

Keys come from a local key server. The vectors' key paths (``/junit/...``) are moved under
``/prod/keys/`` (the only paths the bridge ever fetches), in the header and on the key server
alike; the signatures cover the body only, so no verdict changes. aio-lib-events' cases mock the
key fetch for any URL and send no paths; they get ``/prod/keys/pub-key-js.pem`` in both headers.

Four cases describe no webhook delivery that a current receiver should accept (NOT_DELIVERIES);
they are still sent, and must be refused with nothing published.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aio_pika
import aio_pika.abc
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from bridge.app import create_app
from bridge.config import BrokerConfig
from tests.helpers import SAMPLES, KeyServer, make_config

Client = TestClient[web.Request, web.Application]
SIGS = SAMPLES / "signatures"
CASES = {c["id"]: c for c in json.loads((SIGS / "vectors.json").read_text())["cases"]}
ANY_PATH = "/prod/keys/pub-key-js.pem"

NOT_DELIVERIES = {
    "hmac-legacy-valid": "HMAC x-adobe-signature reached end of life in 2022 and is not "
    "implemented; a request signed only that way is refused (401)",
    "hmac-legacy-invalid": "HMAC scheme, not implemented",
    "hmac-legacy-no-secret": "HMAC scheme, not implemented",
    "js-base64-wrapped-body": "base64-wrapped bodies exist only inside I/O Runtime actions; an "
    "HTTP delivery carries the JSON itself, so this is refused (401)",
}


def moved(path: str) -> str:
    """``/junit/pub-key-1.pem`` → ``/prod/keys/pub-key-junit-pub-key-1.pem``."""
    if path.startswith("/junit/"):
        return "/prod/keys/pub-key-junit-" + path.removeprefix("/junit/")
    return path


def request_headers(case: dict[str, Any]) -> dict[str, str]:
    headers = {"content-type": "application/json"}
    for name, value in case["headers"].items():
        if not value.startswith("("):  # "(not set in the test)"
            headers[name] = moved(value) if name.endswith("-path") else value
    if "(any path)" in case["keys"]:
        for n in (1, 2):
            headers.setdefault(f"x-adobe-public-key{n}-path", ANY_PATH)
    return headers


@pytest.fixture
async def key_server(
    aiohttp_server: Callable[[web.Application], Awaitable[TestServer]],
) -> tuple[KeyServer, str]:
    server = KeyServer()
    running = await aiohttp_server(server.app())
    return server, str(running.make_url("")).rstrip("/")


def expected_events(body: bytes) -> int:
    doc = json.loads(body)
    return len(doc) if isinstance(doc, list) else 1


@pytest.mark.parametrize("case_id", sorted(CASES))
async def test_vector_through_http(
    case_id: str,
    key_server: tuple[KeyServer, str],
    aiohttp_client: Callable[[web.Application], Awaitable[Client]],
    amqp_url: str,
    forget_topology: list[BrokerConfig],
) -> None:
    case = CASES[case_id]
    server, base_url = key_server
    for path, file in case["keys"].items():
        server.keys[ANY_PATH if path == "(any path)" else moved(path)] = (SIGS / file).read_bytes()
    recipient = case["recipient_client_id"] or "no-client-id"
    config = make_config(key_base_url=base_url, amqp_url=amqp_url, client_ids=[recipient])
    forget_topology.append(config.broker)
    client = await aiohttp_client(create_app(config))
    deadline = time.monotonic() + 15
    while (await client.get("/readyz")).status != 200:
        assert time.monotonic() < deadline
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(exclusive=True)
        await queue.bind(config.broker.exchange, routing_key="#")
        body = (SIGS / case["body"]).read_bytes()
        response = await client.post("/webhook", data=body, headers=request_headers(case))
        genuine = case["expected"].startswith("valid") and case_id not in NOT_DELIVERIES
        if genuine:
            assert response.status == 200, await response.text()
            count = expected_events(body)
            messages = []
            for _ in range(50):
                message = await queue.get(fail=False, no_ack=True)
                if message is not None:
                    messages.append(message)
                if len(messages) == count:
                    break
            assert len(messages) == count
        else:
            expected = 403 if "recipient" in case_id else 401
            assert response.status == expected, await response.text()
            assert await queue.get(fail=False, no_ack=True) is None
        # Only the key server was ever asked, and only for allowed paths.
        assert all(hit.startswith("/prod/keys/pub-key-") for hit in server.hits)
