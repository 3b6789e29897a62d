"""The parse step: a verified body's bytes → a :class:`~bridge.adobe.envelope.Delivery`, with
the ``x-adobe-event-id``/``-code`` headers as fallbacks (``bridge.adobe.envelope`` knows the
formats).

Owns: where a body is parsed. A small one on the loop; one over :data:`IN_THREAD_BYTES` (signed,
so only Adobe's or a replay of one, yet possibly a second of work) in a thread, one at a time, so
the loop goes on answering everyone else, and with the cyclic collector paused meanwhile: the
millions of containers a hostile batch makes would set off full collections, each walking all of
them while it holds the interpreter's lock, and with it the loop. Measured, 8 MB of deep arrays
in a batch: the loop's longest wait 580-720 ms and the parse 1.9-2.8 s; paused, 240-290 ms and
1.0 s. Does not: verify, or know the formats.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Mapping
from typing import Final

from bridge.adobe.envelope import MAX_HEADER_FIELD, Delivery, parse_delivery
from bridge.message import header_text

IN_THREAD_BYTES: Final = 1024 * 1024


class Parser:
    """The parse step for one daemon: large bodies in a thread, one at a time."""

    def __init__(self, max_events: int) -> None:
        self.max_events = max_events
        self._large = asyncio.Semaphore(1)

    async def __call__(self, body: bytes, headers: Mapping[str, str]) -> Delivery:
        if len(body) <= IN_THREAD_BYTES:
            return parse(body, headers, self.max_events)
        async with self._large:
            return await asyncio.to_thread(parse, body, headers, self.max_events, paused=True)


def parse(
    body: bytes, headers: Mapping[str, str], max_events: int, paused: bool = False
) -> Delivery:
    """``body`` as a delivery; ``paused``: with the cyclic collector off meanwhile (only one
    such parse runs at a time: :class:`Parser`)."""
    paused = paused and gc.isenabled()
    if paused:
        gc.disable()
    try:
        event_id = header_text(headers, "x-adobe-event-id", MAX_HEADER_FIELD)
        code = header_text(headers, "x-adobe-event-code", MAX_HEADER_FIELD)
        return parse_delivery(body, event_id, code, max_events)
    finally:
        if paused:
            gc.enable()
