"""Fixtures of the in-process journal tests: a local journal (``tests/adobe_journal.py``) that
says "retry after 0.1 s", and the reader's pauses made short, so each test takes well under a
second. ``tests/conftest.py`` registers them (``pytest_plugins``): ``server`` for every test
module that does not define its own, ``short_waits`` where a module asks for it
(``pytestmark = pytest.mark.usefixtures("short_waits")``)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from bridge import journal
from tests.adobe_journal import JournalServer


@pytest.fixture
def short_waits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(journal, "MIN_BACKOFF", 0.02)
    monkeypatch.setattr(journal, "MIN_WAIT", 0.02)


@pytest.fixture
def server() -> Iterator[JournalServer]:
    with JournalServer(retry_after=0.1) as running:
        yield running
