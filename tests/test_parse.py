"""The parse step's placement: small bodies on the loop, large ones in a thread with the cyclic
collector paused, and the collector always as it was afterwards."""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from typing import Any

import orjson
import pytest

from bridge import parse as parse_module
from bridge.adobe.envelope import Delivery, parse_delivery
from bridge.errors import BadRequest
from bridge.parse import IN_THREAD_BYTES, Parser, parse
from tests.helpers import EVENTS

LIGHTROOM = orjson.loads((EVENTS / "imaging_lightroom-job-status_succeeded.json").read_bytes())


@pytest.fixture
def seen(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[bool, bool]]]:
    """For each parse: (on the main thread, the collector enabled)."""
    calls: list[tuple[bool, bool]] = []
    real = parse_delivery

    def spy(*args: Any) -> Delivery:
        calls.append((threading.current_thread() is threading.main_thread(), gc.isenabled()))
        return real(*args)

    monkeypatch.setattr(parse_module, "parse_delivery", spy)
    yield calls
    assert gc.isenabled()


def batch(size: int) -> bytes:
    element = {**LIGHTROOM, "pad": "p" * 2000}
    count = size // len(orjson.dumps(element)) * 2
    return orjson.dumps([{**element, "event_id": f"e{i}"} for i in range(count)])


async def test_a_small_body_is_parsed_on_the_loop(seen: list[tuple[bool, bool]]) -> None:
    delivery = await Parser(1000)(orjson.dumps(LIGHTROOM), {"x-adobe-event-id": "h"})
    assert seen == [(True, True)]
    assert delivery.events[0].event_id == LIGHTROOM["event_id"]


async def test_a_large_body_is_parsed_in_a_thread_with_the_collector_paused(
    seen: list[tuple[bool, bool]],
) -> None:
    body = batch(IN_THREAD_BYTES + 1)
    assert len(body) > IN_THREAD_BYTES
    delivery = await Parser(1000)(body, {})
    assert seen == [(False, False)]
    assert gc.isenabled()
    assert [e.event_id for e in delivery.events][:2] == ["e0", "e1"]


async def test_the_collector_comes_back_when_the_parse_fails(
    seen: list[tuple[bool, bool]],
) -> None:
    with pytest.raises(BadRequest):
        await Parser(1000)(b"[" + b" " * IN_THREAD_BYTES + b"{", {})
    assert seen == [(False, False)]
    assert gc.isenabled()


def test_a_collector_someone_else_paused_stays_paused() -> None:
    gc.disable()
    try:
        parse(orjson.dumps(LIGHTROOM), {}, 1000, paused=True)
        assert not gc.isenabled()
    finally:
        gc.enable()
