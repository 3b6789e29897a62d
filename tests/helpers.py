"""Shared test helpers: sample paths, configs, signing, a local key server, a fake publisher."""

from __future__ import annotations

import base64
import dataclasses
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aio_pika
import aio_pika.abc
from aiohttp import web
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from bridge.config import (
    BrokerConfig,
    Config,
    OutboxConfig,
    Registration,
    ServerConfig,
    VerificationConfig,
)
from bridge.config_links import split_urls
from bridge.errors import BrokerUnavailable
from bridge.message import Outbound
from bridge.rules import default_routes
from bridge.topology import default_topology

SAMPLES = Path(__file__).parent / "data" / "adobe-samples"
EVENTS = SAMPLES / "events"
CLIENT_ID = "test-client"
KEY_PATH = "/prod/keys/pub-key-test1.pem"
KEY_PATH_2 = "/prod/keys/pub-key-test2.pem"


def make_config(
    key_base_url: str = "http://127.0.0.1:9",
    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/",
    names: str | None = None,
    client_ids: Sequence[str] = (CLIENT_ID,),
    **server: Any,
) -> Config:
    """A config for tests; ``names`` prefixes the exchanges and queue so tests never share."""
    prefix = names or f"test.{uuid.uuid4().hex[:10]}"
    exchange, unrouted = f"{prefix}.events", f"{prefix}.unrouted"
    return Config(
        server=dataclasses.replace(ServerConfig(port=0), **server),
        broker=BrokerConfig(
            urls=tuple(split_urls(amqp_url)),
            heartbeat=5,
            connect_timeout=2.0,
            publish_timeout=3.0,
            reconnect_max_delay=1.0,
            exchange=f"{prefix}.events",
            unrouted_exchange=f"{prefix}.unrouted",
            unrouted_queue=f"{prefix}.unrouted",
        ),
        verification=VerificationConfig(key_base_url=key_base_url, key_fetch_timeout=1.0),
        registrations=(Registration("default", "/webhook", tuple(client_ids)),),
        topology=default_topology(exchange, unrouted, unrouted),
        outbox=OutboxConfig(mode="off"),
        routes=default_routes(exchange),
    )


@dataclasses.dataclass
class SigningKey:
    private: rsa.RSAPrivateKey

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(rsa.generate_private_key(public_exponent=65537, key_size=2048))

    @property
    def public_pem(self) -> bytes:
        return self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def sign(self, body: bytes) -> str:
        return base64.b64encode(
            self.private.sign(body, padding.PKCS1v15(), hashes.SHA256())
        ).decode()

    def headers(self, body: bytes, **extra: str) -> dict[str, str]:
        """Adobe's headers for ``body``, both signatures made with this key."""
        signature = self.sign(body)
        headers = {
            "content-type": "application/json",
            "user-agent": "Adobe/1.0",
            "x-adobe-delivery-id": str(uuid.uuid4()),
            "x-adobe-digital-signature-1": signature,
            "x-adobe-digital-signature-2": signature,
            "x-adobe-public-key1-path": KEY_PATH,
            "x-adobe-public-key2-path": KEY_PATH,
        }
        headers.update(extra)
        return headers


class KeyServer:
    """Serves public keys by path on loopback, like static.adobeioevents.com; counts hits."""

    def __init__(self) -> None:
        self.keys: dict[str, bytes] = {}
        self.hits: list[str] = []
        self.behaviour: dict[str, str] = {}  # path -> "redirect" | "hang" | "error" | "huge"

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/{tail:.*}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.StreamResponse:
        import asyncio

        self.hits.append(request.path)
        behaviour = self.behaviour.get(request.path)
        if behaviour == "redirect":
            raise web.HTTPFound("http://127.0.0.1:9/elsewhere.pem")
        if behaviour == "hang":
            await asyncio.sleep(30)
        if behaviour == "error":
            raise web.HTTPServiceUnavailable()
        if behaviour == "huge":
            return web.Response(body=b"A" * (2 * 1024 * 1024))
        key = self.keys.get(request.path)
        if key is None:
            raise web.HTTPNotFound()
        return web.Response(body=key, content_type="application/x-pem-file")


class FakePublisher:
    """Records what would be published; ``fail`` makes every publish a 503."""

    def __init__(self) -> None:
        self.published: list[Outbound] = []
        self.ready = True
        self.fail = False

    async def publish(self, messages: Sequence[Outbound], deadline: float | None = None) -> None:
        if self.fail:
            raise BrokerUnavailable("not_connected", "fake broker is down")
        self.published.extend(messages)


def key_folder(root: Path, signer: SigningKey, *paths: str) -> str:
    """Write the signer's public key under ``root`` at each path; return the file:// base URL."""
    for path in paths or (KEY_PATH,):
        file = root / path.lstrip("/")
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_bytes(signer.public_pem)
    return f"file://{root}"


FULL_AFTER_ONE: dict[str, Any] = {"x-max-length": 1, "x-overflow": "reject-publish"}


async def fanout_queue(
    channel: aio_pika.abc.AbstractChannel, name: str, **arguments: Any
) -> tuple[aio_pika.abc.AbstractExchange, aio_pika.abc.AbstractQueue]:
    """A throw-away fanout exchange ``name`` and an exclusive queue bound to it (``arguments``:
    the queue's, e.g. :data:`FULL_AFTER_ONE`, which nacks every publish after the first)."""
    exchange = await channel.declare_exchange(name, aio_pika.ExchangeType.FANOUT, auto_delete=True)
    queue = await channel.declare_queue(exclusive=True, arguments=arguments or None)
    await queue.bind(exchange)
    return exchange, queue
