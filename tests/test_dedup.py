"""The deduplication window: by age, by count, and flat in memory from the start."""

from __future__ import annotations

import tracemalloc

from bridge.dedup import RecentIds


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_an_id_is_seen_until_it_is_too_old() -> None:
    clock = Clock()
    recent = RecentIds(10, 60, clock)
    assert "a" not in recent
    assert len(recent) == 0
    recent.add("a")
    assert "a" in recent
    assert "b" not in recent
    clock.now += 59
    assert "a" in recent
    clock.now += 2
    assert "a" not in recent
    assert len(recent) == 0


def test_the_oldest_ids_make_room_for_new_ones() -> None:
    recent = RecentIds(3, 600, Clock())
    for event_id in ("a", "b", "c", "d"):
        recent.add(event_id)
    assert "a" not in recent
    assert all(e in recent for e in ("b", "c", "d"))
    recent.add("b")  # seen again: not a second slot
    recent.add("e")
    assert "b" not in recent  # its slot was the oldest
    assert len(recent) == 3


def test_memory_is_taken_at_the_start_and_stays_flat() -> None:
    clock = Clock()
    tracemalloc.start()
    try:
        recent = RecentIds(20_000, 600, clock)
        start, _ = tracemalloc.get_traced_memory()
        for n in range(60_000):
            clock.now += 0.01
            recent.add(f"registration\nevent-{n:012d}-with-a-longer-id")
        end, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(recent) == 20_000
    assert end < start * 1.05, (start, end)
