"""Label values that signed input chooses are bounded: the first N, then `other`; with workers,
each gauge adds up (or not) as its meaning says."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from bridge import metrics
from tests.conftest import ROOT


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


def _in_a_worker(folder: Path, code: str) -> str:
    """Run ``code`` in a fresh process writing its metrics under ``folder``, as a worker does."""
    done = subprocess.run(
        [sys.executable, "-c", f"from bridge import metrics\n{code}"],
        cwd=ROOT,
        env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(folder)},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stdout


def test_with_workers_the_outbox_depth_adds_up_and_the_oldest_age_is_the_largest(
    tmp_path: Path,
) -> None:
    for depth, age in ((3, 5.0), (4, 50.0)):
        _in_a_worker(
            tmp_path, f"metrics.OUTBOX_DEPTH.set({depth})\nmetrics.OUTBOX_OLDEST_AGE.set({age})"
        )
    text = _in_a_worker(
        tmp_path,
        "from prometheus_client import generate_latest\n"
        "print(generate_latest(metrics.registry()).decode())",
    )
    values = {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    assert values["bridge_outbox_depth"] == 7
    assert values["bridge_outbox_oldest_age_seconds"] == 50
