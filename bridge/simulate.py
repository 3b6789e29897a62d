"""Act as Adobe I/O Events: development keys, the challenge, signed deliveries, retries.

Owns: ``events-bridge keys generate`` (an RSA-2048 pair named as Adobe names its keys) and
``events-bridge simulate``. The simulator speaks as Adobe does (the README, "Verification"): the
challenge ``GET <url>?challenge=<uuid>`` first; then each delivery as a ``POST`` signed with
RSA-SHA256 over the exact body bytes, both signature headers and both key-path headers,
``user-agent: Adobe/1.0``, a fresh ``x-adobe-delivery-id`` per attempt,
``x-adobe-event-id``/``-code`` on single deliveries, ``x-adobe-retry-count`` on retries and a W3C
``traceparent``. With ``--batch N`` events travel as JSON arrays of up to N. With ``--retry`` it
retries 429 and 5xx (but 505), and no answer within 10 s, on Adobe's schedule (1, 2, 4, 8, 15, 15, …
minutes for 24 h), scaled by ``--time-scale``.

Does not: run inside the daemon; nothing here is imported by ``serve``.
"""

from __future__ import annotations

import asyncio
import base64
import os
import secrets
import sys
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from bridge.adobe.envelope import parse_delivery
from bridge.adobe.signature import key_path_allowed
from bridge.errors import BadRequest, UsageError

ADOBE_TIMEOUT = 10.0  # Adobe's whole-attempt timeout
RETRY_MINUTES = (1, 2, 4, 8)  # then every 15 minutes
RETRY_CAP_MINUTES = 15
RETRY_WINDOW_MINUTES = 24 * 60
_KEY_ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


@dataclass(frozen=True)
class DevKeys:
    private_key: Path
    public_key: Path
    key_path: str  # the value for x-adobe-public-keyN-path
    base_url: str  # BRIDGE_KEY_BASE_URL that serves it


def generate_keys(folder: Path, name: str | None = None, force: bool = False) -> DevKeys:
    """Write ``folder/prod/keys/pub-key-NAME.pem`` and ``folder/private/pub-key-NAME.key.pem``."""
    name = name or "".join(secrets.choice(_KEY_ALPHABET) for _ in range(10))
    key_path = f"/prod/keys/pub-key-{name}.pem"
    if not key_path_allowed(key_path):
        raise UsageError(f"key name {name!r} is not allowed: use letters, digits, _ and -")
    folder = folder.resolve()
    public = folder / key_path.lstrip("/")
    private = folder / "private" / f"pub-key-{name}.key.pem"
    if not force and (public.exists() or private.exists()):
        raise UsageError(f"{public} already exists (use --force to replace it)")
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    try:
        public.parent.mkdir(parents=True, exist_ok=True)
        private.parent.mkdir(parents=True, exist_ok=True)
        private.parent.chmod(0o700)
        # Created owner-only from the start: never readable by others, not even for a moment.
        descriptor = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(private_pem)
        public.write_bytes(public_pem)
    except OSError as exc:
        raise UsageError(f"cannot write keys into {folder}: {exc.strerror or exc}") from None
    return DevKeys(private, public, key_path, f"file://{folder}")


def load_private_key(path: Path) -> rsa.RSAPrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except OSError as exc:
        raise UsageError(f"cannot read private key {path}: {exc.strerror}") from None
    except (ValueError, TypeError):
        raise UsageError(f"{path} is not an unencrypted PEM private key") from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise UsageError(f"{path} is not an RSA private key")
    return key


def sign(key: rsa.RSAPrivateKey, body: bytes) -> str:
    return base64.b64encode(key.sign(body, padding.PKCS1v15(), hashes.SHA256())).decode()


@dataclass
class Delivery:
    body: bytes
    events: int
    event_id: str | None
    event_code: str | None
    cloudevents: bool
    attempts: int = 0
    statuses: list[int | str] = field(default_factory=list)

    @property
    def accepted(self) -> bool:
        return (
            bool(self.statuses)
            and isinstance(self.statuses[-1], int)
            and 200 <= self.statuses[-1] < 300
        )


def load_events(files: Sequence[Path]) -> list[tuple[bytes, Any]]:
    """Each file's events: one event per file, or each element of a file holding an array."""
    events: list[tuple[bytes, Any]] = []
    for path in files:
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise UsageError(f"cannot read {path}: {exc.strerror}") from None
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise UsageError(f"{path} is not JSON: {exc}") from None
        if isinstance(doc, list):
            events.extend((orjson.dumps(item), item) for item in doc)
        elif isinstance(doc, dict):
            events.append((raw, doc))
        else:
            raise UsageError(f"{path} holds neither an event object nor an array of events")
    return events


def build_deliveries(
    events: list[tuple[bytes, Any]], batch: int, client_id: str | None
) -> list[Delivery]:
    """Group events into deliveries. Unchanged events keep their file's exact bytes."""
    prepared: list[tuple[bytes, Any]] = []
    for raw, doc in events:
        if client_id is not None and isinstance(doc, dict):
            # Adobe adds the recipient to every payload it delivers (both names until 2026 ends).
            signed = {**doc, "recipientclientid": client_id, "recipient_client_id": client_id}
            prepared.append((orjson.dumps(signed), signed))
        else:
            prepared.append((raw, doc))
    deliveries: list[Delivery] = []
    if batch <= 0:
        for raw, doc in prepared:
            event_id = code = None
            try:
                parsed = parse_delivery(raw).events
                if parsed:
                    event_id, code = parsed[0].event_id, parsed[0].event_code
            except BadRequest:
                pass
            deliveries.append(Delivery(raw, 1, event_id, code, "specversion" in doc))
        return deliveries
    for start in range(0, len(prepared), batch):
        group = prepared[start : start + batch]
        body = b"[" + b",".join(raw for raw, _ in group) + b"]"
        deliveries.append(Delivery(body, len(group), None, None, False))
    return deliveries


def retry_delays(time_scale: float) -> list[float]:
    """Adobe's retry schedule in seconds (24 h of it), multiplied by ``time_scale``."""
    delays: list[float] = []
    total = 0
    minutes = list(RETRY_MINUTES)
    while total < RETRY_WINDOW_MINUTES:
        step = minutes.pop(0) if minutes else RETRY_CAP_MINUTES
        total += step
        delays.append(step * 60 * time_scale)
    return delays


@dataclass
class Simulator:
    url: str
    keys: list[rsa.RSAPrivateKey]
    key_paths: list[str]
    provider: str = "events-bridge-simulator"
    retry: bool = False
    time_scale: float = 1.0
    max_attempts: int = 0
    concurrency: int = 1
    quiet: bool = False

    def headers(self, delivery: Delivery) -> dict[str, str]:
        content_type = (
            "application/cloudevents+json; charset=UTF-8"
            if delivery.cloudevents
            else "application/json; charset=utf-8"
        )
        headers = {
            "content-type": content_type,
            "user-agent": "Adobe/1.0",
            "accept-encoding": "deflate,compress,identity",
            "x-adobe-delivery-id": str(uuid.uuid4()),
            "x-adobe-provider": self.provider,
            "traceparent": f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01",
        }
        for n in (1, 2):
            key = self.keys[min(n, len(self.keys)) - 1]
            headers[f"x-adobe-digital-signature-{n}"] = sign(key, delivery.body)
            headers[f"x-adobe-public-key{n}-path"] = self.key_paths[min(n, len(self.key_paths)) - 1]
        if delivery.event_id is not None:
            headers["x-adobe-event-id"] = delivery.event_id
        if delivery.event_code is not None:
            headers["x-adobe-event-code"] = delivery.event_code
        if delivery.attempts > 1:
            headers["x-adobe-retry-count"] = str(delivery.attempts - 1)
        return headers

    async def challenge(self, session: aiohttp.ClientSession) -> None:
        value = str(uuid.uuid4())
        try:
            async with session.get(self.url, params={"challenge": value}) as response:
                text = await response.text()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise UsageError(
                f"challenge failed: cannot reach {self.url}: {exc or 'timeout'}"
            ) from None
        if response.status != 200 or value not in text:
            raise UsageError(
                f"challenge failed: {self.url} answered {response.status} {text[:200]!r}"
            )
        self._say(f"challenge answered by {self.url}")

    async def send(self, session: aiohttp.ClientSession, delivery: Delivery) -> None:
        delays = retry_delays(self.time_scale) if self.retry else []
        while True:
            delivery.attempts += 1
            status: int | str
            try:
                async with session.post(
                    self.url, data=delivery.body, headers=self.headers(delivery)
                ) as response:
                    await response.read()
                    status = response.status
            except (aiohttp.ClientError, TimeoutError) as exc:
                status = "timeout" if isinstance(exc, TimeoutError) else "no-answer"
            delivery.statuses.append(status)
            what = delivery.event_id or f"batch of {delivery.events}"
            self._say(
                f"POST {what}: {status}"
                + (f" (attempt {delivery.attempts})" if delivery.attempts > 1 else "")
            )
            retryable = (
                not isinstance(status, int)
                or status == 429
                or (500 <= status < 600 and status != 505)
            )
            out_of_attempts = self.max_attempts and delivery.attempts >= self.max_attempts
            if not retryable or not delays or out_of_attempts:
                return
            await asyncio.sleep(delays.pop(0))

    async def run(self, deliveries: list[Delivery], challenge: bool = True) -> None:
        timeout = aiohttp.ClientTimeout(total=ADOBE_TIMEOUT)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            if challenge:
                await self.challenge(session)
            gate = asyncio.Semaphore(max(1, self.concurrency))

            async def one(delivery: Delivery) -> None:
                async with gate:
                    await self.send(session, delivery)

            await asyncio.gather(*(one(d) for d in deliveries))

    def _say(self, text: str) -> None:
        if not self.quiet:
            print(text, file=sys.stderr, flush=True)
