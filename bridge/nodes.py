"""The broker's nodes, as the link reaches them: one URL each (a cluster lists several, SPEC §9),
opened with TLS where the URL says ``amqps://`` (SPEC §8), and watched for a node that stops
answering without closing the connection (cut off, frozen).

Part of the deliver step, under ``bridge.link`` (which chooses the node and supervises the
connection). Owns:

- :class:`Node`: a URL with our heartbeat, how logs and metrics name it (``host:port``, never
  the password), and :meth:`Node.open`, the connection (TLS context and server name included);
- :class:`Watchdog`: a cheap round trip (``Basic.Qos`` on a channel of its own) every second. A
  node that does not answer within :data:`PROBE_TIMEOUT` is taken as gone, so the link fails
  over in seconds instead of waiting for the heartbeat (three missed: about 30 s). A connection
  the broker has *blocked* (a memory or disk alarm) is not probed: its silence is the alarm's,
  and another node would be blocked the same (alarms are cluster-wide).

Also :func:`connect_first`, for the commands that need one connection to the cluster.

Does not: retry, choose the next node, or publish.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import aio_pika
import aio_pika.abc
import aio_pika.exceptions
from yarl import URL

from bridge.config_links import redact
from bridge.config_types import BrokerConfig
from bridge.errors import UsageError
from bridge.tls import client_context, tls_problem

PROBE_INTERVAL: Final = 1.0
# Longer than any answer of a live node (a quorum queue's re-election delays confirms, not this).
PROBE_TIMEOUT: Final = 3.0


@dataclass(frozen=True)
class Node:
    """One broker node of the configured list."""

    url: str  # with our heartbeat unless the URL sets its own
    name: str  # host:port, for logs, metrics and /readyz
    redacted: str  # the URL as configured, its password masked

    @classmethod
    def from_url(cls, url: str, heartbeat: int) -> Node:
        parsed = URL(url)
        if "heartbeat" not in parsed.query:
            parsed = parsed.update_query(heartbeat=heartbeat)
        port = parsed.port or (5671 if parsed.scheme == "amqps" else 5672)
        host = parsed.host or "?"
        name = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        return cls(str(parsed), name, redact(url))

    @property
    def tls(self) -> bool:
        return self.url.startswith("amqps://")

    async def open(
        self,
        *,
        connect_timeout: float,
        name: str,
        context: ssl.SSLContext | None,
        server_name: str = "",
    ) -> aio_pika.abc.AbstractConnection:
        """A new connection to this node (``context`` and ``server_name`` for ``amqps://``)."""
        connection = aio_pika.Connection(
            URL(self.url),
            ssl_context=context if self.tls else None,
            client_properties={"connection_name": name},
        )
        if self.tls and server_name:
            # aio-pika passes on only the URL's parameters; aiormq hands the rest of its
            # keyword arguments to asyncio.open_connection, which checks this name.
            connection.kwargs["server_hostname"] = server_name
        await connection.connect(timeout=connect_timeout)
        return connection


async def connect_first(config: BrokerConfig, name: str) -> aio_pika.abc.AbstractConnection:
    """A connection to the first node of ``config`` that answers (for commands: ``tail``,
    ``declare``); :class:`UsageError` with each node's reason when none does."""
    context = (
        client_context(config.tls) if any(u.startswith("amqps://") for u in config.urls) else None
    )
    reasons: list[str] = []
    for url in config.urls:
        node = Node.from_url(url, config.heartbeat)
        try:
            return await node.open(
                connect_timeout=config.connect_timeout,
                name=name,
                context=context,
                server_name=config.tls.server_name,
            )
        except (OSError, aio_pika.exceptions.AMQPError, TimeoutError) as exc:
            reason = (tls_problem(exc) if node.tls else None) or str(exc) or type(exc).__name__
            reasons.append(f"{node.redacted}: {reason}")
    raise UsageError("cannot connect to " + "; nor to ".join(reasons))


def blocked(connection: aio_pika.abc.AbstractConnection) -> bool:
    """Whether the broker has blocked this connection (``Connection.Blocked``: an alarm). aiormq
    keeps it privately; where it does not, the answer is False (and a blocked node may then be
    left for another, which is blocked the same: no harm but a reconnect)."""
    underlay = getattr(getattr(connection, "transport", None), "connection", None)
    unblocked = getattr(underlay, "_Connection__connection_unblocked", None)
    return isinstance(unblocked, asyncio.Event) and not unblocked.is_set()


class Watchdog:
    """Probes a connection every :data:`PROBE_INTERVAL`; calls ``on_silent`` once when a probe
    goes unanswered for :data:`PROBE_TIMEOUT` (unless the connection is blocked)."""

    def __init__(
        self,
        connection: aio_pika.abc.AbstractConnection,
        on_silent: Callable[[str], None],
    ) -> None:
        self._connection = connection
        self._on_silent = on_silent
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        channel = await self._connection.channel(publisher_confirms=False)
        self._task = asyncio.create_task(self._watch(channel), name="broker-watchdog")

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _watch(self, channel: aio_pika.abc.AbstractChannel) -> None:
        while not channel.is_closed:
            await asyncio.sleep(PROBE_INTERVAL)
            if blocked(self._connection):
                continue
            try:
                async with asyncio.timeout(PROBE_TIMEOUT):
                    await channel.set_qos(prefetch_count=0)
            except TimeoutError:
                if blocked(self._connection) or channel.is_closed:
                    continue
                self._on_silent(f"no answer to a probe within {PROBE_TIMEOUT:g} s")
                return
            except Exception as exc:  # noqa: BLE001 - whatever it is, the probe got no answer
                if not self._connection.is_closed:  # closed: the link has the news already
                    self._on_silent(f"the probe failed: {type(exc).__name__}: {exc}")
                return
