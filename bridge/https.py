"""HTTPS on the webhook port (SPEC §8): the accept loop, and each connection's TLS handshake
under the connection guard (:mod:`bridge.connections`).

Why not ``loop.create_server(ssl=...)``: there a connection becomes the application's only once
its handshake is done. Until then it holds a descriptor the guard cannot see, count or close, so
half-open handshakes (a TLS slowloris) could take every descriptor while the guard counts none.
Here each accepted socket is counted at once, in state ``handshake``: shed first at the bound,
as an idle connection is, and closed at ``server.header_timeout``. The handshake itself is the
event loop's own (``loop.connect_accepted_socket(ssl=...)``, uvloop's or asyncio's, as
``create_server`` would do it), with the context the guard holds when the connection comes:
SIGHUP's rotation puts a new one there (:func:`bridge.tls.reload_server_context`).

A failed handshake (plain HTTP to the HTTPS port, no client certificate or a refused one, a
reset) gets no answer; it is counted (``bridge_connections_closed_total``, reason
``handshake_failed``) and said at info level at most once a minute, with OpenSSL's reason.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import ssl
import time
from collections.abc import Callable
from typing import Final

import structlog

from bridge.connections import ConnectionGuard, GuardedHandler

log = structlog.get_logger("bridge.https")

FAILURE_LOG_SECONDS: Final = 60.0  # a failed handshake is said at most this often
ACCEPT_PAUSE: Final = 0.1  # seconds without accepting after a failed accept (no descriptor left)
_GONE: Final = (errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.EINTR)


class HttpsListener:
    """Accepts connections on one bound socket and hands each, once secure, to aiohttp's handler
    (``factory``); :meth:`close` stops accepting and ends the handshakes still running."""

    def __init__(
        self,
        guard: ConnectionGuard,
        factory: Callable[[], GuardedHandler],
        sock: socket.socket,
        backlog: int,
    ) -> None:
        self.guard = guard
        self.factory = factory
        self.sock = sock
        self._said = -FAILURE_LOG_SECONDS
        sock.listen(backlog)
        self._accepting = asyncio.get_running_loop().create_task(
            self._accept(), name="https-accept"
        )

    def close(self) -> None:
        # The socket once the accept loop has let go of it (its reader removed from the loop).
        self._accepting.add_done_callback(lambda _: self.sock.close())
        self._accepting.cancel()
        self.guard.close_handshakes()

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(self.sock)
            except OSError as exc:
                if exc.errno in _GONE:
                    continue  # the client gave up before the accept
                # The loop's exception handler says it (bridge.connections.DescriptorAlarm: out
                # of descriptors); a pause, rather than a busy loop on an error that stays.
                loop.call_exception_handler({"message": "socket.accept() failed", "exception": exc})
                await asyncio.sleep(ACCEPT_PAUSE)
                continue
            self._start(conn)

    def _start(self, conn: socket.socket) -> None:
        handler = self.factory()
        if not handler.start_handshake(conn):
            return
        context = self.guard.tls
        assert context is not None
        handler.handshake = asyncio.get_running_loop().create_task(
            self._secure(handler, conn, context), name="tls-handshake"
        )

    async def _secure(
        self, handler: GuardedHandler, conn: socket.socket, context: ssl.SSLContext
    ) -> None:
        # Not run at all when the guard closed the connection first (the socket was its to
        # close); from here on the transport owns the socket, and cancelling closes it.
        handler.handshake_socket = None
        conn.setblocking(False)
        try:
            await asyncio.get_running_loop().connect_accepted_socket(
                lambda: handler,
                conn,
                ssl=context,
                # The guard closes it at header_timeout (its reason counted); a backstop.
                ssl_handshake_timeout=self.guard.header_timeout + 1.0,
            )
        except OSError as exc:  # ssl.SSLError, a reset, the backstop
            if handler.closed_for is None:
                self._failed(exc)
                handler.close_for("handshake_failed")

    def _failed(self, exc: OSError) -> None:
        """Say it at most once a minute: a port scanner must not fill the log, a client
        certificate refused must show."""
        now = time.monotonic()
        if now - self._said >= FAILURE_LOG_SECONDS:
            self._said = now
            log.info(
                "tls_handshake_failed",
                detail=handshake_problem(exc),
                note="said at most once a minute; each is counted in "
                'bridge_connections_closed_total{reason="handshake_failed"}',
            )


def handshake_problem(exc: OSError) -> str:
    """OpenSSL's reason, in its own words: ``HTTP_REQUEST`` (plain HTTP to the HTTPS port),
    ``PEER_DID_NOT_RETURN_A_CERTIFICATE``, ``CERTIFICATE_VERIFY_FAILED`` (with why: expired, an
    unknown CA), ...; else the error's text."""
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return f"{exc.reason}: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason)
    return str(exc) or type(exc).__name__
