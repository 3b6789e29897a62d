"""HTTPS under the connection guard (bridge/https.py), in process, on both event loops the daemon
may run on (uvloop where installed, else asyncio): handshakes are counted from accept, shed
first at the bound, closed at the header timeout; a failed one gets no answer; a new context is
used from the next connection on; closing ends the handshakes under way. The daemon itself over
HTTPS is tested in test_tls_server.py."""

from __future__ import annotations

import asyncio
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest
from aiohttp import web
from cryptography import x509

from bridge.connections import HANDSHAKE, ConnectionGuard
from bridge.https import HttpsListener, handshake_problem
from tests.certs import Authority, Pair

LOOPS = ["asyncio", "uvloop"]
REQUEST = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"


@dataclass(frozen=True)
class Certs:
    ca: Authority
    first: Pair
    second: Pair


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    ca = Authority.create(tmp_path_factory.mktemp("https") / "ca")
    return Certs(ca, ca.issue("first"), ca.issue("second"))


def server_context(pair: Pair) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pair.cert, pair.key)
    return context


def run_on(loop_name: str, scenario: Awaitable[None]) -> None:
    loop: asyncio.AbstractEventLoop
    if loop_name == "uvloop":
        import uvloop

        loop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(asyncio.wait_for(scenario, 30))
    finally:
        loop.close()


@dataclass
class Served:
    guard: ConnectionGuard
    listener: HttpsListener
    port: int
    client: ssl.SSLContext

    async def tls(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection(
            "127.0.0.1", self.port, ssl=self.client, server_hostname="localhost"
        )

    async def tcp(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", self.port)


@asynccontextmanager
async def serving(
    certs: Certs, bound: int = 8, header_timeout: float = 30
) -> AsyncIterator[Served]:
    async def ok(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/", ok)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    assert runner.server is not None
    guard = ConnectionGuard(bound, header_timeout, 30, tls=server_context(certs.first))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    listener = HttpsListener(guard, guard.factory(runner.server, access_log=None), sock, 128)
    client = ssl.create_default_context(cafile=certs.ca.cert_file)
    try:
        yield Served(guard, listener, sock.getsockname()[1], client)
    finally:
        listener.close()
        await runner.cleanup()


async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
    writer.write(REQUEST)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    await asyncio.wait_for(reader.readexactly(2), 5)  # "ok"
    return head


async def closed_by_peer(reader: asyncio.StreamReader, seconds: float) -> bool:
    try:
        return await asyncio.wait_for(reader.read(1024), seconds) == b""
    except ConnectionError:
        return True
    except TimeoutError:
        return False


def serial_of(writer: asyncio.StreamWriter) -> int:
    ssl_object = writer.get_extra_info("ssl_object")
    der = ssl_object.getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der).serial_number


def on_both_loops(test: Callable[[Certs], Awaitable[None]]) -> Callable[..., None]:
    @pytest.mark.parametrize("loop_name", LOOPS)
    def run(loop_name: str, certs: Certs) -> None:
        run_on(loop_name, test(certs))

    run.__name__ = test.__name__
    run.__doc__ = test.__doc__
    return run


@on_both_loops
async def test_plain_http_gets_no_answer_and_a_keep_alive_connection_serves_many(
    certs: Certs,
) -> None:
    async with serving(certs) as served:
        for _ in range(3):  # each time, at once: not at a timeout
            reader, writer = await served.tcp()
            writer.write(REQUEST)
            started = time.monotonic()
            assert await closed_by_peer(reader, 5)
            assert time.monotonic() - started < 1.0
            writer.close()
            reader, writer = await served.tls()
            for _ in range(3):
                assert (await answer(reader, writer)).startswith(b"HTTP/1.1 200")
            writer.close()
        assert served.guard.count <= 1  # the last TLS one may not be gone yet


@on_both_loops
async def test_half_open_handshakes_are_shed_at_the_bound_and_closed_at_the_timeout(
    certs: Certs,
) -> None:
    async with serving(certs, bound=8, header_timeout=1.5) as served:
        flood = [await served.tcp() for _ in range(20)]  # far over the bound, and silent
        await asyncio.sleep(0.2)
        assert served.guard.count == 8
        assert len(served.guard.by_state[HANDSHAKE]) == 8
        started = time.monotonic()
        reader, writer = await served.tls()  # sheds the oldest handshake
        assert (await answer(reader, writer)).startswith(b"HTTP/1.1 200")
        assert time.monotonic() - started < 1.0
        closed = [await closed_by_peer(r, 3) for r, _ in flood]
        assert all(closed)
        assert time.monotonic() - started < 3.0  # at the header timeout, not later
        assert served.guard.by_state[HANDSHAKE] == {}
        assert (await answer(reader, writer)).startswith(b"HTTP/1.1 200")
        for _, w in [*flood, (reader, writer)]:
            w.close()


@on_both_loops
async def test_a_new_context_serves_new_connections_and_open_ones_keep_theirs(
    certs: Certs,
) -> None:
    first = x509.load_pem_x509_certificate(certs.first.cert.read_bytes()).serial_number
    second = x509.load_pem_x509_certificate(certs.second.cert.read_bytes()).serial_number
    async with serving(certs) as served:
        old_reader, old_writer = await served.tls()
        assert serial_of(old_writer) == first
        served.guard.tls = server_context(certs.second)
        reader, writer = await served.tls()
        assert serial_of(writer) == second
        assert (await answer(reader, writer)).startswith(b"HTTP/1.1 200")
        for _ in range(3):
            assert (await answer(old_reader, old_writer)).startswith(b"HTTP/1.1 200")
        assert serial_of(old_writer) == first
        old_writer.close()
        writer.close()


@on_both_loops
async def test_closing_the_listener_ends_the_handshakes_under_way(certs: Certs) -> None:
    async with serving(certs) as served:
        flood = [await served.tcp() for _ in range(5)]
        await asyncio.sleep(0.2)
        assert len(served.guard.by_state[HANDSHAKE]) == 5
        served.listener.close()
        assert served.guard.count == 0
        assert all([await closed_by_peer(r, 2) for r, _ in flood])
        for _, writer in flood:
            writer.close()
        await asyncio.sleep(0.1)
        current = asyncio.current_task()
        left = [t.get_name() for t in asyncio.all_tasks() if t is not current]
        assert not [name for name in left if name in {"tls-handshake", "https-accept"}]


def test_a_failed_handshake_is_said_in_openssls_words() -> None:
    plain = ssl.SSLError(1, "[SSL: HTTP_REQUEST] http request")
    plain.reason = "HTTP_REQUEST"
    assert handshake_problem(plain) == "HTTP_REQUEST"
    expired = ssl.SSLCertVerificationError(1, "certificate verify failed")
    expired.reason = "CERTIFICATE_VERIFY_FAILED"
    expired.verify_message = "certificate has expired"
    assert handshake_problem(expired) == "CERTIFICATE_VERIFY_FAILED: certificate has expired"
    assert handshake_problem(ConnectionResetError()) == "ConnectionResetError"


ACCEPT_WITHOUT_DESCRIPTORS = """
import asyncio, os, resource, socket, ssl, sys, time
import uvloop
from aiohttp import web
from structlog.testing import capture_logs
from bridge.connections import ConnectionGuard, DescriptorAlarm
from bridge.https import HttpsListener

cert, key, ca = sys.argv[1:4]

async def ok(_):
    return web.Response(text="ok")

async def main():
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(DescriptorAlarm())
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    client = ssl.create_default_context(cafile=ca)
    app = web.Application()
    app.router.add_get("/", ok)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    guard = ConnectionGuard(10_000, 1.5, 30, tls=context)  # more than the descriptors hold
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    HttpsListener(guard, guard.factory(runner.server, access_log=None), sock, 128)
    port = sock.getsockname()[1]
    made = [socket.socket() for _ in range(60)]  # every client socket before the limit
    late = socket.socket()
    used = len(os.listdir("/proc/self/fd"))
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (used + 20, hard))
    for s in made:
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
    await asyncio.sleep(0.5)  # the accept loop runs out of descriptors and pauses
    for s in made:
        s.close()  # the daemon side goes at the header timeout
    late.setblocking(False)
    late.connect_ex(("127.0.0.1", port))
    await asyncio.sleep(0.1)
    reader, writer = await asyncio.open_connection(
        sock=late, ssl=client, server_hostname="localhost"
    )
    writer.write(b"GET / HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n")
    answer = await asyncio.wait_for(reader.read(1024), 10)
    writer.close()
    print(answer.split(b"\\r\\n")[0].decode())

with capture_logs() as logs:
    uvloop.run(main())
print(sorted({line["event"] for line in logs}))
"""


def test_the_accept_loop_out_of_descriptors_says_so_and_recovers(certs: Certs) -> None:
    """No descriptor left to accept with (more connections than the process may hold): the
    alarm is raised, accepting pauses rather than spins, and resumes once descriptors free up."""
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            ACCEPT_WITHOUT_DESCRIPTORS,
            str(certs.first.cert),
            str(certs.first.key),
            str(certs.ca.cert_file),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    status, events = done.stdout.splitlines()
    assert status == "HTTP/1.1 200 OK"
    assert "descriptors_exhausted" in events
