"""Fixtures and helpers of the in-process journal tests: a local journal
(``tests/adobe_journal.py``) that says "retry after 0.1 s", the reader's pauses made short, so
each test takes well under a second, and a taker that records pages (no broker).
``tests/conftest.py`` registers the fixtures (``pytest_plugins``): ``server`` for every test
module that does not define its own, ``short_waits`` where a module asks for it
(``pytestmark = pytest.mark.usefixtures("short_waits")``)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

import pytest

from bridge import journal, metrics
from bridge.adobe.journal import Page
from bridge.checkpoint import Checkpoint
from bridge.config_types import ImsConfig, JournalConfig
from bridge.journal import JournalReader, Progress, first_url
from tests.adobe_journal import JournalServer


@pytest.fixture
def short_waits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(journal, "MIN_BACKOFF", 0.02)
    monkeypatch.setattr(journal, "MIN_WAIT", 0.02)


@pytest.fixture
def server() -> Iterator[JournalServer]:
    with JournalServer(retry_after=0.1) as running:
        yield running


class Taker:
    """Takes pages, recording them; ``answers``: what it says to the first pages (then True)."""

    def __init__(self, *answers: bool) -> None:
        self.pages: list[Page] = []
        self.times: list[float] = []
        self.answers = list(answers)

    async def __call__(self, page: Page) -> bool:
        self.pages.append(page)
        self.times.append(time.monotonic())
        return self.answers.pop(0) if self.answers else True

    @property
    def positions(self) -> list[str]:
        return [entry.position for page in self.pages for entry in page.entries]


class Saves(Checkpoint):
    """A checkpoint that also records every position it saves."""

    def __init__(self, folder: Path, url: str) -> None:
        super().__init__(folder, url)
        self.saved: list[str] = []

    def save(self, position: str) -> None:
        super().save(position)
        self.saved.append(position)


def configure(server: JournalServer, limit: int = 3) -> JournalConfig:
    ims = ImsConfig(
        token_url=server.token_url,
        client_id=server.client_id,
        client_secret=server.client_secret,
        org_id=server.org_id,
    )
    return JournalConfig(url=server.journal_url, limit=limit, timeout=5.0, ims=ims)


def events(prefix: str, count: int, **extra: Any) -> list[dict[str, Any]]:
    return [{"event_id": f"{prefix}{i}", "type": "test", **extra} for i in range(count)]


def reader(
    server: JournalServer,
    take: Taker,
    *,
    since: str | None = None,
    start: str = "oldest",
    limit: int = 3,
    checkpoint: Checkpoint | None = None,
    until_end: bool = True,
    fatal: Collection[str] = (),
) -> JournalReader:
    config = configure(server, limit)
    url = first_url(config, since, start)
    return JournalReader(config, url, take, checkpoint, until_end=until_end, fatal=fatal)


async def run_until(made: JournalReader, done: Any, seconds: float = 2.0) -> Progress:
    """Run a following reader (no ``until_end``) until ``done()``, then stop it."""
    task = asyncio.create_task(made.run())
    deadline = time.monotonic() + seconds
    while not done() and time.monotonic() < deadline and not task.done():
        await asyncio.sleep(0.01)
    made.stop()
    return await asyncio.wait_for(task, 1.0)


def errors(kind: str) -> float:
    found = metrics.REGISTRY.get_sample_value("bridge_journal_errors_total", {"kind": kind})
    return found or 0.0


def renewals(reason: str) -> float:
    found = metrics.REGISTRY.get_sample_value(
        "bridge_journal_token_renewals_total", {"reason": reason}
    )
    return found or 0.0


def statuses(server: JournalServer) -> list[int]:
    return [int(r["status"]) for r in server.requests]
