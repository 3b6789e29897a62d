"""A journal page into the road (``bridge.journal_intake``), read by the real reader from the
stand-in journal, with a publisher of the test's: what is safe, what is skipped, what stops."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Any

import orjson
import pytest

from bridge.config_types import ImsConfig, JournalConfig
from bridge.intake import Intake
from bridge.journal import FATAL, JournalFailed, JournalReader, first_url
from bridge.journal_intake import JournalIntake
from bridge.message import Outbound
from bridge.publisher import PublishFailed
from tests.adobe_journal import JournalServer
from tests.helpers import FakePublisher, make_config
from tests.rig import body_for

pytestmark = pytest.mark.usefixtures("short_waits")  # tests/journal_fixtures.py


class Refuses(FakePublisher):
    """Confirms every message but those of ``poison``, which no broker takes (too large, say)."""

    def __init__(self, poison: str) -> None:
        super().__init__()
        self.poison = poison

    async def publish(self, messages: Sequence[Outbound], deadline: float | None = None) -> None:
        refused = [(m, "larger than the broker takes") for m in messages if self._bad(m)]
        self.published.extend(m for m in messages if not self._bad(m))
        if refused:
            raise PublishFailed("unpublishable", refused[0][1], (), refused)

    def _bad(self, message: Outbound) -> bool:
        return message.message_id == self.poison


def one_shot(server: JournalServer, publisher: FakePublisher) -> JournalReader:
    ims = ImsConfig(
        token_url=server.token_url,
        client_id=server.client_id,
        client_secret=server.client_secret,
        org_id=server.org_id,
    )
    config = JournalConfig(url=server.journal_url, limit=10, timeout=5.0, ims=ims)
    take = JournalIntake(Intake(make_config(), None, publisher), "default", 2.0)
    return JournalReader(
        config, first_url(config, None, "oldest"), take, until_end=True, fatal=FATAL
    )


def event(event_id: str) -> dict[str, Any]:
    found: dict[str, Any] = orjson.loads(body_for(event_id))
    return found


async def test_a_page_is_published_once_and_read_to_the_end(server: JournalServer) -> None:
    server.add_many(event(f"e{i}") for i in range(5))
    publisher = FakePublisher()
    progress = await one_shot(server, publisher).run()
    assert [m.message_id for m in publisher.published] == [f"e{i}" for i in range(5)]
    assert progress.events == 5


async def test_an_event_of_another_client_is_skipped_not_retried(server: JournalServer) -> None:
    server.add_many([event("mine"), {**event("theirs"), "recipientclientid": "someone-else"}])
    publisher = FakePublisher()
    progress = await one_shot(server, publisher).run()
    assert [m.message_id for m in publisher.published] == ["mine"]
    assert progress.position == server.positions[-1]


async def test_an_event_no_broker_takes_does_not_hold_the_journal_forever(
    server: JournalServer,
) -> None:
    server.add_many([event("a"), event("poison"), event("b")])
    publisher = Refuses("poison")
    # Skipping it (logged, counted) or stopping with one line are fine answers; looping is not.
    with contextlib.suppress(JournalFailed, TimeoutError):
        await asyncio.wait_for(one_shot(server, publisher).run(), 3.0)
    published = [m.message_id for m in publisher.published]
    assert published.count("a") == 1, f"published {published.count('a')} times"
    assert published.count("b") == 1
