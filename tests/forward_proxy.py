"""A plain HTTP forward proxy on 127.0.0.1 for the journal's proxy tests: it records each request
(method, absolute target, ``Proxy-Authorization``) and forwards it with aiohttp: the absolute
form a client sends for an ``http://`` target (RFC 9112 §3.2.2). ``CONNECT``, which an
``https://`` target takes, is recorded and refused with ``connect_status`` (a proxy that wants
other credentials: 407), which is where a client's error text could show the proxy's password.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from types import TracebackType

import aiohttp

HOP_BY_HOP = {"connection", "keep-alive", "proxy-authorization", "proxy-connection", "host"}
FRAMING = {"content-length", "transfer-encoding", "content-encoding", "connection"}


@dataclass
class Seen:
    method: str
    target: str
    proxy_authorization: str | None


@dataclass
class ForwardProxy:
    seen: list[Seen] = field(default_factory=list)
    connect_status: int = 407
    port: int = 0
    _server: asyncio.Server | None = None
    _session: aiohttp.ClientSession | None = None
    _clients: set[asyncio.StreamWriter] = field(default_factory=set)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> ForwardProxy:
        self._session = aiohttp.ClientSession(auto_decompress=False, trust_env=False)
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._server is not None
        assert self._session is not None
        self._server.close()
        for writer in self._clients:
            writer.close()
        await self._server.wait_closed()
        await self._session.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._clients.add(writer)
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError, ValueError):
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
                method, target, _version = head[0].split(" ", 2)
                lines = [line.split(":", 1) for line in head[1:] if line]
                headers = [(name.strip(), value.strip()) for name, value in lines]
                said = {name.lower(): value for name, value in headers}
                body = await reader.readexactly(int(said.get("content-length", "0")))
                self.seen.append(Seen(method, target, said.get("proxy-authorization")))
                if method == "CONNECT":
                    status = f"HTTP/1.1 {self.connect_status} Refused by the test\r\n"
                    writer.write(f"{status}Content-Length: 0\r\n\r\n".encode())
                    await writer.drain()
                    continue
                writer.write(await self._forward(method, target, headers, body))
                await writer.drain()
        self._clients.discard(writer)
        writer.close()

    async def _forward(
        self, method: str, target: str, headers: list[tuple[str, str]], body: bytes
    ) -> bytes:
        assert self._session is not None
        passed = [(k, v) for k, v in headers if k.lower() not in HOP_BY_HOP | FRAMING]
        async with self._session.request(
            method, target, headers=passed, data=body or None, allow_redirects=False
        ) as answer:
            payload = await answer.read()
            lines = [f"HTTP/1.1 {answer.status} {answer.reason}"]
            lines += [f"{k}: {v}" for k, v in answer.headers.items() if k.lower() not in FRAMING]
            lines.append(f"Content-Length: {len(payload)}")
            return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + payload
