"""The connection guard's pure parts: the bound and the descriptor alarm (the daemon's
connections under floods are in test_serve_hostile.py)."""

from __future__ import annotations

import asyncio
import subprocess
import sys

from aiohttp import web

from bridge.connections import RESERVED_DESCRIPTORS, ConnectionGuard, connection_bound


def test_the_bound_leaves_descriptors_for_everything_else() -> None:
    assert connection_bound(1024, 1_048_576) == 1024
    assert connection_bound(1024, 256) == 256 - RESERVED_DESCRIPTORS
    assert connection_bound(1024, 10) == 1


def test_running_out_of_descriptors_is_logged_whatever_the_loop() -> None:
    """uvloop drops a connection it cannot accept without a word: the once-a-second look at
    the open descriptors is what tells the operator."""
    script = """
import os, resource, tempfile
import structlog
from structlog.testing import capture_logs
from bridge.connections import DescriptorAlarm
used = len(os.listdir("/proc/self/fd"))
hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
resource.setrlimit(resource.RLIMIT_NOFILE, (used + 20, hard))
alarm = DescriptorAlarm()
with capture_logs() as logs:
    alarm.check()
    assert not logs, logs
    held = [tempfile.TemporaryFile() for _ in range(15)]
    alarm.check()
print(logs[0]["event"], logs[0]["error"])
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("descriptors_exhausted ")
    assert "descriptors open" in done.stdout


async def test_a_burst_of_connections_never_holds_more_than_the_bound() -> None:
    """Waves of connections, each far over the bound, opened at once: every newcomer sheds a
    different idle one, so the bound holds (a shed one counts no more, though it closes a loop
    turn later)."""

    async def ok(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/", ok)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    guard = ConnectionGuard(8, header_timeout=30, idle_timeout=30)
    assert runner.server is not None
    server = await asyncio.get_running_loop().create_server(
        guard.factory(runner.server, access_log=None), "127.0.0.1", 0
    )
    port = server.sockets[0].getsockname()[1]
    clients: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        for _ in range(5):
            clients += await asyncio.gather(
                *(asyncio.open_connection("127.0.0.1", port) for _ in range(50))
            )
            await asyncio.sleep(0.3)
            still_open = [r for r, _ in clients if not r.at_eof()]
            assert len(still_open) <= 8
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await asyncio.wait_for(reader.read(1024), 5)).startswith(b"HTTP/1.1 200")
        writer.close()
    finally:
        for _, writer in clients:
            writer.close()
        server.close()
        await runner.cleanup()
