"""The HTTP edge's connections: bounded in number and in time, shed idle ones first.

Part of receive. Left alone, aiohttp keeps a connection as long as the client likes: no deadline
for a request's headers, keep-alive for an hour. Anyone could then hold every descriptor the
process has, and new connections (Adobe's, ``/healthz``) would fail. Here:

- ``server.header_timeout``: a request's headers must be complete this long after their first
  byte (or after the connection opened);
- ``server.idle_timeout``: a connection with no request in progress, before its first request
  or between two, is closed after this;
- ``server.max_connections`` (less what the process's descriptor limit cannot hold): at the
  bound, a new connection first sheds the connection idle the longest, else the one that has
  been waiting for headers or a body the longest (at least :data:`SHED_MIN_AGE`), else is closed
  itself. A request whose body has arrived (``mark_busy``) is never shed;
- aiohttp's own answers to malformed requests (a bad request line, headers too long) are JSON,
  as every refusal is;
- HTTPS (``server.tls``, :mod:`bridge.https`): a connection is counted from ``accept``, in
  state ``handshake`` until its TLS handshake is done; it is shed as an idle one is, and closed
  at ``server.header_timeout``. aiohttp sees it only once it is secure.

Relies on aiohttp's public ``web.RequestHandler``: its constructor (the keywords of
``web.AppRunner``), the asyncio protocol methods and ``handle_error``, each override calling the
original. Does not: read bodies or answer webhooks (``bridge.receiver``).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import resource
import socket
import ssl
import time
from typing import Any, Final

import orjson
import structlog
from aiohttp import web

from bridge import metrics

log = structlog.get_logger("bridge.connections")

SHED_MIN_AGE: Final = 1.0  # seconds a slow reader has had before it may be shed
RESERVED_DESCRIPTORS: Final = 64  # for the broker, the outbox, key fetches, logs

IDLE, HANDSHAKE, HEADERS, REQUEST, BUSY = "idle", "handshake", "headers", "request", "busy"


class ConnectionGuard:
    """Every open connection, its state and its timer; see the module docstring."""

    def __init__(
        self,
        max_connections: int,
        header_timeout: float,
        idle_timeout: float,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.max_connections = max_connections
        self.header_timeout = header_timeout
        self.idle_timeout = idle_timeout
        self.tls = tls  # HTTPS: what new handshakes use (SIGHUP puts a new one here)
        # The open connections by state, each in the order it entered the state (oldest
        # first), so a victim is found at once however many connections there are.
        self.by_state: dict[str, dict[GuardedHandler, None]] = {
            state: {} for state in (IDLE, HANDSHAKE, HEADERS, REQUEST, BUSY)
        }
        self.count = 0

    def factory(self, server: web.Server, **handler_args: Any) -> Any:
        """The protocol factory for ``loop.create_server``: aiohttp's handler, guarded."""
        loop = asyncio.get_running_loop()
        handler_args.setdefault("keepalive_timeout", self.idle_timeout)

        def make() -> GuardedHandler:
            return GuardedHandler(server, self, loop=loop, **handler_args)

        return make

    def admit(self) -> bool:
        """Make room for one more connection at the bound; False when nothing can be shed."""
        if self.count < self.max_connections:
            return True
        firsts = (next(iter(self.by_state[s]), None) for s in (IDLE, HANDSHAKE))
        quiet = [c for c in firsts if c is not None]
        victim = min(quiet, key=lambda c: c.since, default=None)
        if victim is None:
            now = time.monotonic()
            slow = [
                c
                for c in (next(iter(self.by_state[s]), None) for s in (HEADERS, REQUEST))
                if c is not None and now - c.since >= SHED_MIN_AGE
            ]
            victim = min(slow, key=lambda c: c.since, default=None)
        if victim is None:
            metrics.CONNECTIONS_CLOSED.labels("over_limit").inc()
            return False
        victim.close_for(f"shed_{victim.state}")
        return True

    def move(self, connection: GuardedHandler, old: str | None, new: str | None) -> None:
        """Book ``connection`` from state ``old`` to ``new`` (None: not counted)."""
        if old is not None and self.by_state[old].pop(connection, 0) is None:
            self.count -= 1
        if new is not None:
            self.by_state[new][connection] = None
            self.count += 1
        metrics.CONNECTIONS_OPEN.set(self.count)

    def close_handshakes(self) -> None:
        """Stopping: the handshakes still running end now (no new request may start)."""
        for connection in list(self.by_state[HANDSHAKE]):
            connection.close_for("stopping")


NEW, CLOSING = "new", "closing"  # not counted: not admitted yet, or closed


class GuardedHandler(web.RequestHandler):
    """aiohttp's request handler, one per connection, with the guard's state and timer."""

    def __init__(self, server: web.Server, guard: ConnectionGuard, **kwargs: Any) -> None:
        super().__init__(server, **kwargs)
        self.guard = guard
        self.state = NEW
        self.since = time.monotonic()
        self.closed_for: str | None = None  # why the guard closed it, if it did
        self._timer: asyncio.TimerHandle | None = None
        # HTTPS, until the handshake is done (bridge.https): the accepted socket, while no
        # transport owns it yet, and the task that runs the handshake.
        self.handshake_socket: socket.socket | None = None
        self.handshake: asyncio.Task[Any] | None = None

    # -- the asyncio protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.state == HANDSHAKE:  # HTTPS: admitted at accept, and secure now
            self.handshake = None
            super().connection_made(transport)
            self._enter(IDLE, self.guard.idle_timeout)
            return
        super().connection_made(transport)
        if not self.guard.admit():
            self.force_close()
            return
        self._enter(IDLE, self.guard.idle_timeout)

    def data_received(self, data: bytes) -> None:
        if self.state == IDLE and data:
            self._enter(HEADERS, self.guard.header_timeout)
        super().data_received(data)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._leave()
        super().connection_lost(exc)

    def start_handshake(self, sock: socket.socket) -> bool:
        """HTTPS: count ``sock`` (just accepted) in state ``handshake``; False when the bound
        leaves no room (``sock`` is closed then)."""
        if not self.guard.admit():
            sock.close()
            return False
        self.handshake_socket = sock
        self._enter(HANDSHAKE, self.guard.header_timeout)
        return True

    # -- what the request tells ---------------------------------------------------------------

    def request_started(self) -> None:
        self._enter(REQUEST, None)

    def request_busy(self) -> None:
        self._enter(BUSY, None)

    def request_finished(self) -> None:
        self._enter(IDLE, self.guard.idle_timeout)

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """aiohttp's answer to a request it could not parse (or a handler that failed outside
        the middleware): JSON, logged quietly, and the connection closed after it."""
        if request.writer.output_size > 0:
            raise ConnectionError("a response was already being sent")
        metrics.CONNECTIONS_CLOSED.labels("bad_request").inc()
        level = log.info if status < 500 else log.warning
        level("bad_http_request", status=status, detail=message or type(exc).__name__)
        response = web.Response(
            status=status,
            body=orjson.dumps(
                {"error": "bad_request" if status < 500 else "internal_error", "detail": message}
            ),
            content_type="application/json",
            headers={"X-Content-Type-Options": "nosniff"},
        )
        response.force_close()
        return response

    # -- the timer ----------------------------------------------------------------------------

    def _enter(self, state: str, timeout: float | None) -> None:
        if self.state == CLOSING:
            return  # shed or timed out already: a late word from the request changes nothing
        self.guard.move(self, None if self.state == NEW else self.state, state)
        self.state, self.since = state, time.monotonic()
        self._cancel_timer()
        if timeout is not None and (self.transport is not None or state == HANDSHAKE):
            self._timer = asyncio.get_running_loop().call_later(
                timeout, self.close_for, f"{state}_timeout"
            )

    def _leave(self) -> None:
        """No longer counted: closing, or closed."""
        self._cancel_timer()
        if self.state not in (NEW, CLOSING):
            self.guard.move(self, self.state, None)
        self.state = CLOSING

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def close_for(self, reason: str) -> None:
        """Close the connection now, and stop counting it at once (its ``connection_lost``
        comes a loop turn later: a burst of newcomers must not shed it again)."""
        self._leave()
        self.closed_for = reason
        metrics.CONNECTIONS_CLOSED.labels(reason).inc()
        log.debug("connection_closed", reason=reason)
        if self.handshake is not None:  # HTTPS, before aiohttp has the connection
            self.handshake.cancel()  # closes the transport that owns the socket, if one does
            self.handshake = None
        if self.handshake_socket is not None:  # no transport yet: the socket is ours
            self.handshake_socket.close()
            self.handshake_socket = None
        self.force_close()


def mark_busy(request: web.BaseRequest) -> None:
    """The request's body has arrived: the work that follows is not a slow reader's."""
    protocol = request.protocol
    if isinstance(protocol, GuardedHandler):
        protocol.request_busy()


def raise_descriptor_limit() -> int:
    """Raise the soft limit on open descriptors to the hard one; the soft limit after it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if wanted > soft:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def connection_bound(configured: int, descriptors: int) -> int:
    """The connections the process can hold: the configured bound, less than its descriptors."""
    return max(1, min(configured, descriptors - RESERVED_DESCRIPTORS))


_EXHAUSTED: Final = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
_FD_FOLDER: Final = "/proc/self/fd"
WATCH_SECONDS: Final = 1.0
NEAR_LIMIT: Final = 8  # descriptors left: new connections (and files) are about to fail


class DescriptorAlarm:
    """Says ``descriptors_exhausted`` (at most once a second, counted) when the process runs
    out of descriptors: as a loop exception handler, for asyncio's failed ``accept()``, and
    from :meth:`watch`, once a second, for uvloop (libuv drops such a connection silently)."""

    def __init__(self) -> None:
        self._last = 0.0

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno in _EXHAUSTED:
            self.alarm(str(exc))
            return
        loop.default_exception_handler(context)

    def alarm(self, error: str) -> None:
        metrics.DESCRIPTORS_EXHAUSTED.inc()
        now = time.monotonic()
        if now - self._last >= 1.0:
            self._last = now
            log.error(
                "descriptors_exhausted",
                error=error,
                limit=resource.getrlimit(resource.RLIMIT_NOFILE)[0],
                action="new connections fail; raise the descriptor limit (ulimit -n) or lower "
                "server.max_connections",
            )

    def check(self) -> bool:
        """Alarm when fewer than :data:`NEAR_LIMIT` descriptors are left; False where the
        open descriptors cannot be counted (no ``/proc``: not Linux)."""
        try:
            used = len(os.listdir(_FD_FOLDER))
        except FileNotFoundError:
            return False
        except OSError as exc:
            if exc.errno in _EXHAUSTED:  # none left even to look
                self.alarm(str(exc))
            return True
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if limit - used < NEAR_LIMIT:
            self.alarm(f"{used} of {limit} descriptors open")
        return True

    async def watch(self) -> None:
        while self.check():  # noqa: ASYNC110 - no event tells that descriptors run short
            await asyncio.sleep(WATCH_SECONDS)
