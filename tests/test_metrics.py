"""Label values that signed input chooses are bounded: the first N, then `other`."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from prometheus_client import generate_latest

from bridge import metrics


@pytest.fixture
def bounded() -> Iterator[None]:
    metrics.configure(max_event_codes=3, max_job_statuses=2)
    yield
    metrics.configure(max_event_codes=100, max_job_statuses=20)


@pytest.mark.usefixtures("bounded")
def test_the_first_codes_and_statuses_keep_their_series_the_rest_are_other() -> None:
    for n in range(50):
        metrics.events_published(f"unbounded-code-{n}", f"status-{n % 7}").inc()
    text = generate_latest(metrics.REGISTRY).decode()
    series = [
        line
        for line in text.splitlines()
        if (line.startswith("bridge_events_published_total{") and "unbounded-code" in line)
        or line.startswith('bridge_events_published_total{event_code="other"')
    ]
    codes = {line.split('event_code="')[1].split('"')[0] for line in series}
    assert len(codes - {"other"}) <= 3
    assert "other" in codes
    assert len(series) <= 4 * 3


def test_a_long_value_is_other_from_the_start() -> None:
    first = metrics.FirstSeen(10)
    assert first("x" * 200) == metrics.OTHER
    assert first("short") == "short"
