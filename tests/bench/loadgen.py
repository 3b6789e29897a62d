"""Load generator for ``make bench``: POST pre-signed requests over N connections for T seconds.

Runs in a process of its own (the server under test must not share its interpreter). Prints one
JSON line: requests answered 2xx, events in them, other answers, latency percentiles, and the
CPU seconds the generator itself used.

It is a bare HTTP/1.1 keep-alive client on asyncio protocols (uvloop when installed): each request
is encoded to bytes once, before the clock starts, and an answer is parsed only as far as its
status line and ``Content-Length``. A general-purpose client (aiohttp's) costs about ten times
more CPU per request, and on a 2-core machine shared with the server and the broker every
microsecond it burns is taken from what is measured. Each connection has one request in flight
(no pipelining), as Adobe's sender does. An ``https://`` URL is sent over TLS (``--cafile``: the CA
that signed the server's certificate), each connection kept alive: one handshake per connection.

    python tests/bench/loadgen.py URL BODIES.jsonl --connections 64 --seconds 20 [--cafile CA]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import ssl
import time
from pathlib import Path
from typing import cast
from urllib.parse import urlsplit

MAX_HEADER = 64 * 1024


def encode(host: str, path: str, body: bytes, headers: dict[str, str]) -> bytes:
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}", f"Content-Length: {len(body)}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class Client(asyncio.Protocol):
    """One keep-alive connection: send a request, read its answer, report it, repeat."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.started = 0.0
        self.events: list[str] = []
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.send()

    def send(self) -> None:
        slot = self.run.slot()
        if slot is not None:  # paced (--rate): wait for this request's turn
            asyncio.get_running_loop().call_at(slot, self.send_now)
            return
        self.send_now()

    def send_now(self) -> None:
        item = self.run.next_request()
        if item is None or self.transport is None:
            if self.transport is not None:
                self.transport.close()
            return
        data, self.events = item
        self.started = time.perf_counter()
        self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buffer) > MAX_HEADER:
                self.fail("header too long")
            return
        head = bytes(self.buffer[:end]).decode("latin-1").split("\r\n")
        length = 0
        for line in head[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        if len(self.buffer) < end + 4 + length:
            return
        del self.buffer[: end + 4 + length]
        status = int(head[0].split(" ", 2)[1])
        self.run.answered(status, time.perf_counter() - self.started, self.events)
        self.events = []
        self.send()

    def fail(self, why: str) -> None:
        self.run.others[why] = self.run.others.get(why, 0) + 1
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.events:  # a request was in flight
            self.run.others["connection_lost"] = self.run.others.get("connection_lost", 0) + 1
        if not self.closed.done():
            self.closed.set_result(None)


class Run:
    def __init__(
        self, requests: list[tuple[bytes, list[str]]], seconds: float, rate: float = 0
    ) -> None:
        self.requests = requests
        self.rate = rate
        self.reserved = 0
        self.first_slot = asyncio.get_running_loop().time()
        self.next_index = 0
        self.deadline = time.monotonic() + seconds
        self.latencies: list[float] = []
        self.ok_requests = 0
        self.ids: list[str] = []
        self.others: dict[str, int] = {}

    def slot(self) -> float | None:
        """With a rate: the loop time at which the next request may go (None: at once)."""
        if not self.rate:
            return None
        self.reserved += 1
        return self.first_slot + self.reserved / self.rate

    def next_request(self) -> tuple[bytes, list[str]] | None:
        if self.next_index >= len(self.requests) or time.monotonic() >= self.deadline:
            return None
        item = self.requests[self.next_index]
        self.next_index += 1
        return item

    def answered(self, status: int, seconds: float, events: list[str]) -> None:
        self.latencies.append(seconds)
        if 200 <= status < 300:
            self.ok_requests += 1
            self.ids.extend(events)
        else:
            self.others[str(status)] = self.others.get(str(status), 0) + 1


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("requests", type=Path, help="JSON lines: {body, headers, events}")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--rate", type=float, default=0, help="requests/s in all (0: no limit)")
    parser.add_argument("--cafile", help="https: the CA of the server's certificate")
    args = parser.parse_args()
    url = urlsplit(args.url)
    tls = ssl.create_default_context(cafile=args.cafile) if url.scheme == "https" else None
    host, port = url.hostname or "127.0.0.1", url.port or (443 if tls else 80)
    requests = []
    for line in args.requests.read_text().splitlines():
        item = json.loads(line)
        data = encode(f"{host}:{port}", url.path, item["body"].encode(), item["headers"])
        requests.append((data, item["events"]))
    loop = asyncio.get_running_loop()
    cpu_before = time.process_time()
    run = Run(requests, args.seconds, args.rate)
    started = time.monotonic()
    clients = []
    for _ in range(args.connections):
        _, client = await loop.create_connection(lambda: Client(run), host, port, ssl=tls)
        clients.append(client)
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(args.seconds + 15):
            await asyncio.gather(*(c.closed for c in clients))
    elapsed = time.monotonic() - started
    cpu = time.process_time() - cpu_before
    latencies = sorted(run.latencies)

    def pct(p: float) -> float:
        return (
            latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000 if latencies else 0
        )

    print(
        json.dumps(
            {
                "seconds": elapsed,
                "requests": run.ok_requests,
                "events": len(run.ids),
                "others": run.others,
                "p50_ms": pct(0.50),
                "p99_ms": pct(0.99),
                "ids": run.ids,
                "exhausted": run.next_index >= len(requests),
                "cpu_s": cpu,
            }
        )
    )


if __name__ == "__main__":
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency where it builds
        asyncio.run(main())
    else:
        uvloop.run(main())
