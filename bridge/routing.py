"""Where each event goes: pure, from the event and the configured exchange.

The default rule (SPEC §5): exchange ``adobe.events`` (topic), routing key
``<event code>.<job status>``, with ``none`` for events that carry no job status, e.g.
``lightroom-job-status.succeeded`` or ``aem.sites.contentFragment.modified.none``. Consumers
bind with topic patterns: ``*.failed``, ``lightroom-job-status.#``, ``#``.

Whatever no queue is bound for is not lost: the events exchange has ``adobe.unrouted`` as its
alternate exchange (declared by ``bridge.publisher``), so the broker parks it there.

Does not: publish, or know anything of AMQP beyond names.
"""

from __future__ import annotations

from dataclasses import dataclass

from bridge.adobe.envelope import Event

NO_STATUS = "none"


@dataclass(frozen=True)
class Target:
    exchange: str
    routing_key: str


def routing_key(event: Event) -> str:
    return f"{event.event_code}.{event.job_status or NO_STATUS}"


class Router:
    """Maps an event to its publish targets (one, with the default rule)."""

    def __init__(self, exchange: str) -> None:
        self._exchange = exchange

    def route(self, event: Event) -> tuple[Target, ...]:
        return (Target(self._exchange, routing_key(event)),)
