"""The daemon's lifetime, from bound sockets to the last drained request.

In order: the sockets are bound (a second daemon on the same port stops there), the application
is built and set up (the outbox folder's lock, the broker connection), the sockets listen, and
the process serves until SIGTERM or SIGINT (SIGHUP reloads the config, and the HTTPS certificate),
a fatal start-up problem, or (a worker) its parent's death. Then the listeners close, the
requests in flight are answered, and the application's resources are closed (:mod:`bridge.app`).
With HTTPS, :mod:`bridge.https` accepts on the sockets instead of ``loop.create_server``, so that
handshakes are under the connection guard too. Only ``serve`` imports this.
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import socket
from collections.abc import Coroutine
from typing import Any

import structlog
from aiohttp import web

from bridge import tracing
from bridge.app import PUBLISHER, create_app, reload_config
from bridge.config import Config, ServerConfig, load_config
from bridge.connections import (
    ConnectionGuard,
    DescriptorAlarm,
    connection_bound,
    raise_descriptor_limit,
)
from bridge.errors import ConfigError, Unavailable, UsageError
from bridge.https import HttpsListener
from bridge.publisher import AmqpPublisher
from bridge.tls import reload_server_context, server_context
from bridge.workers import PARENT_PID, WorkerSpec

log = structlog.get_logger("bridge.cli")

# A request allocates hundreds of objects (a batch, thousands) and frees nearly all of them by
# reference counting. At Python's default of 700, the cyclic collector ran 160 times a second per
# worker under batch load, its older generations walked every object the daemon holds, and it
# took a quarter of the CPU (measured with gc.callbacks). 20,000 lets request garbage go the
# cheap way; cycles (an exception's traceback) are still collected, a few times a minute.
GC_THRESHOLD = 20_000


def run(main: Coroutine[Any, Any, int]) -> int:
    """``asyncio.run``, except that tasks a library leaves behind cannot hold the exit: they get
    a bounded time to end after cancellation (aio-pika's close ignores cancellation)."""
    loop: asyncio.AbstractEventLoop
    try:
        import uvloop  # faster event loop where installed (Linux and macOS)

        loop = uvloop.new_event_loop()
    except ImportError:
        loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(main)
    finally:
        # Drained and on the way out: another SIGTERM (a service manager's second, say) must not
        # turn the clean exit into a death by signal once the loop's handler is gone.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        leftovers = asyncio.all_tasks(loop)
        for task in leftovers:
            task.cancel()
        if leftovers:
            loop.run_until_complete(asyncio.wait(leftovers, timeout=2.0))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


async def serve(config: Config, path: str, worker: WorkerSpec) -> int:
    """Serve ``config`` (read from ``path``, re-read on SIGHUP) until stopped; 0, or a
    :class:`UsageError` for a fatal problem."""
    server = config.server
    loop = asyncio.get_running_loop()
    alarm = DescriptorAlarm()
    loop.set_exception_handler(alarm)
    bound = _connection_bound(server.max_connections)
    # The port first, then the outbox: a second daemon on the same port stops here, before it
    # reads (or replays) anything of the first one's. It listens only once all is ready.
    sockets = bind(server.host, server.port, reuse_port=worker.count > 1)
    app = create_app(config, worker=worker, tracing=tracing.from_environment())
    tune_gc()  # before the broker connection, which a reconnect replaces, exists
    handler_args: dict[str, Any] = {
        "access_log": None,
        # aiohttp's own idle timer starts with each connection too: a second after the guard's,
        # so the guard closes idle connections (and counts them), and aiohttp's is a backstop.
        "keepalive_timeout": server.idle_timeout + 1.0,
        "auto_decompress": False,  # bodies are verified as they came: see the receiver
        "lingering_time": 1.0,
    }
    # HTTPS (SPEC §8): the guard runs the handshakes, which must end within header_timeout.
    context = server_context(server.tls) if server.tls.enabled else None
    runner = await _set_up(app, server, sockets, handler_args)
    guard = ConnectionGuard(bound, server.header_timeout, server.idle_timeout, tls=context)
    assert runner.server is not None
    factory = guard.factory(runner.server, **handler_args)
    listeners: list[asyncio.AbstractServer | HttpsListener] = [
        await loop.create_server(factory, sock=sock, backlog=1024)
        if context is None
        else HttpsListener(guard, factory, sock, backlog=1024)
        for sock in sockets
    ]
    log.info(
        "bridge_listening",
        host=server.host,
        port=sockets[0].getsockname()[1],
        scheme="https" if context is not None else "http",
        client_certificates="required" if server.tls.client_ca_file else None,
        config=config.source,
        max_connections=bound,
    )
    watch = asyncio.create_task(alarm.watch(), name="descriptor-watch")
    signalled, problem = await _until_stopped(app, path, worker, guard)
    watch.cancel()
    log.info("bridge_stopping", signal=signalled, problem=problem)
    for listener in listeners:  # stop accepting (HTTPS: and end the handshakes under way);
        listener.close()  # then answer what is in flight
    # Lets in-flight requests finish (shutdown_timeout), then cleanup_ctx.
    await runner.cleanup()
    if problem is not None:
        raise UsageError(problem)
    return 0


async def _set_up(
    app: web.Application,
    server: ServerConfig,
    sockets: list[socket.socket],
    handler_args: dict[str, Any],
) -> web.AppRunner:
    """The application started (its ``cleanup_ctx`` entered), or a one-line error."""
    runner = web.AppRunner(
        app, handle_signals=False, shutdown_timeout=server.shutdown_timeout, **handler_args
    )
    try:
        await runner.setup()
    except Unavailable as exc:  # the outbox folder is locked or cannot be opened
        for sock in sockets:
            sock.close()
        raise UsageError(exc.detail) from None
    return runner


async def _until_stopped(
    app: web.Application, path: str, worker: WorkerSpec, guard: ConnectionGuard
) -> tuple[str | None, str | None]:
    """Serve until SIGTERM or SIGINT (SIGHUP reloads the config, and the HTTPS certificate),
    a fatal start-up problem, or (a worker) the parent's death; the signal and the problem."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    received: list[str] = []
    reloads: set[asyncio.Task[bool]] = set()

    def on_signal(signum: signal.Signals) -> None:
        received.append(signum.name)
        stop.set()

    def on_hangup() -> None:
        reload_certificate(guard, path)
        task = loop.create_task(reload_config(app, path))
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    loop.add_signal_handler(signal.SIGHUP, on_hangup)
    publisher = app[PUBLISHER]
    fatal = publisher.fatal if isinstance(publisher, AmqpPublisher) else None
    waiters: list[asyncio.Future[Any]] = [asyncio.ensure_future(stop.wait())]
    if fatal is not None:
        waiters.append(fatal)  # passive topology missing at start-up: stop with one line
    if worker.count > 1:  # a worker whose parent died (SIGKILL) stops by itself
        parent = int(os.environ.get(PARENT_PID, "0")) or os.getppid()
        waiters.append(asyncio.ensure_future(_parent_gone(parent, received)))
    await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    for waiter in waiters:
        waiter.cancel()
    problem = (
        fatal.result() if fatal is not None and fatal.done() and not fatal.cancelled() else None
    )
    return (received[0] if received else None), problem


def reload_certificate(guard: ConnectionGuard, path: str) -> None:
    """SIGHUP: with HTTPS on, a new context from the certificate, key and client CA the config
    file names now replaces the guard's, so the next handshakes present them; connections already
    open keep theirs. Files that do not load leave the running context, with an error line. With
    HTTPS off, a config that turns it on is said to need a restart (a config that does not load
    at all is ``config_reload_failed``'s to say)."""
    try:
        tls = load_config(path, sections=("server",)).server.tls
    except ConfigError as exc:
        if guard.tls is not None:
            _tls_reload_failed(path, exc.problems)
        return
    try:
        context = reload_server_context(tls, guard.tls)
    except ConfigError as exc:
        _tls_reload_failed(path, exc.problems, running=guard.tls is not None)
        return
    if context is not None:
        guard.tls = context
        log.info("tls_reloaded", cert_file=tls.cert_file, key_file=tls.key_file)


def _tls_reload_failed(path: str, problems: list[str], running: bool = True) -> None:
    action = "keeping the running certificate" if running else "serving plain HTTP"
    log.error("tls_reload_failed", config=path, problems=problems, action=action)


async def _parent_gone(parent: int, received: list[str]) -> None:
    while os.getppid() == parent:  # noqa: ASYNC110 - no event tells of a parent's death
        await asyncio.sleep(1.0)
    received.append("parent_gone")


def _connection_bound(configured: int) -> int:
    """``server.max_connections``, lowered to what the descriptor limit (raised to its hard
    limit first) can hold."""
    descriptors = raise_descriptor_limit()
    bound = connection_bound(configured, descriptors)
    if bound < configured:
        log.warning(
            "connection_bound_lowered",
            max_connections=bound,
            descriptor_limit=descriptors,
            detail="the process may not open more descriptors: raise its limit (ulimit -n)",
        )
    return bound


def bind(host: str, port: int, reuse_port: bool) -> list[socket.socket]:
    """Bound (not yet listening) sockets for every address of ``host``, or a one-line error."""
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    addresses = list(dict.fromkeys((family, address) for family, _, _, _, address in found))
    if port == 0:
        addresses = addresses[:1]  # one chosen port: the others would each get their own
    sockets: list[socket.socket] = []
    try:
        for family, address in addresses:
            sock = socket.socket(family, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.setblocking(False)
    except OSError as exc:
        for sock in sockets:
            sock.close()
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sockets


def tune_gc() -> None:
    """What start-up made (modules, the app, the dedup ring) is kept for good: move it out of
    the collector's sight, and collect less often. A flood of 1.8 MB requests refused with 401
    or 400 still left a worker's RSS flat (measured: 300 of each, 75 MB before, 95 MB at peak
    with 8 in flight, no growth after)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD, 10, 10)
