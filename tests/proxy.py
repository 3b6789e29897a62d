"""A TCP proxy on loopback that a test controls: forward, or act as a dead broker."""

from __future__ import annotations

import asyncio
import contextlib


class Proxy:
    """Forwards 127.0.0.1:<port> to a target. ``down()`` resets every connection and refuses
    new ones, as a stopped broker would; ``up()`` forwards again. ``blackhole`` keeps sockets
    open and forwards nothing; ``drop_replies`` forwards to the broker but nothing back (confirms
    lost on the way); ``latency`` delays every chunk."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self.accepting = True
        self.blackhole = False
        self.drop_replies = False
        self.latency = 0.0
        self.cut_after: int | None = None  # tear each new connection after this many bytes
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        self.down()
        for task in list(self._handlers):
            task.cancel()
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 5)

    def down(self) -> None:
        self.accepting = False
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    def up(self) -> None:
        self.accepting = True

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            await self._forward(reader, writer)
        except asyncio.CancelledError:
            pass  # stop() ends the connections it serves; that is not an error
        finally:
            self._handlers.discard(task)

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.accepting:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        if not self.accepting:  # down() ran while we were connecting upstream
            writer.transport.abort()
            up_writer.transport.abort()
            return
        self._writers.update((writer, up_writer))

        budget = self.cut_after

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, replies: bool) -> None:
            nonlocal budget
            with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                while data := await src.read(65536):
                    if self.latency:
                        await asyncio.sleep(self.latency)
                    if self.blackhole or (replies and self.drop_replies):
                        continue
                    if budget is not None and not replies:
                        if len(data) >= budget:  # a torn frame: part of it, then the cut
                            dst.write(data[:budget])
                            await dst.drain()
                            writer.transport.abort()
                            break
                        budget -= len(data)
                    dst.write(data)
                    await dst.drain()
            dst.transport.abort()

        await asyncio.gather(pipe(reader, up_writer, False), pipe(up_reader, writer, True))
        self._writers.discard(writer)
        self._writers.discard(up_writer)
