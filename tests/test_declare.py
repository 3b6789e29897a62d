"""``bridge.declare.deprecations``: what a topology asks that RabbitMQ 4.0 deprecates and later
versions refuse (closing the whole connection) is said before the broker says it, by
``check-config``, ``declare`` and ``serve``. The declarations themselves are tested on the real
broker in ``tests/test_topology.py``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import structlog

from bridge.app import create_app
from bridge.config import parse_config
from bridge.declare import deprecations
from tests.helpers import CLIENT_ID, FakePublisher
from tests.processes import cli

QUEUES = """
  queues:
    - {name: kept, type: classic}
    - {name: fleeting, type: classic, durable: false}
    - {name: placed, type: classic, arguments: {x-queue-master-locator: min-masters}}
    - {name: led, type: quorum, arguments: {x-queue-leader-locator: balanced}}
"""


def config_text(queues: str = QUEUES) -> str:
    return f"""
broker:
  url: amqp://guest:guest@127.0.0.1:1/
verification:
  key_base_url: file:///nowhere
registrations:
  - {{name: default, path: /webhook, client_ids: [{CLIENT_ID}]}}
outbox:
  mode: "off"
topology:
  exchanges:
    - {{name: adobe.events, type: topic, alternate_exchange: adobe.unrouted}}
    - {{name: adobe.unrouted, type: fanout}}
{queues}
routes:
  - name: everything
    targets: [{{exchange: adobe.events}}]
"""


def test_each_deprecated_queue_is_named_once_with_what_to_do() -> None:
    found = deprecations(parse_config(config_text(), "t.yaml", {}).topology)
    assert found == [
        "queue 'fleeting': a classic queue with durable: false is a transient non-exclusive "
        "queue, deprecated by RabbitMQ 4.0 and refused by later versions; make it durable",
        "queue 'placed': x-queue-master-locator is deprecated by RabbitMQ 4.0 and refused by "
        "later versions; use x-queue-leader-locator",
    ]


def test_a_topology_of_durable_queues_has_nothing_to_say() -> None:
    queues = "  queues:\n    - {name: kept, type: classic}\n    - {name: led, type: quorum}\n"
    assert deprecations(parse_config(config_text(queues), "t.yaml", {}).topology) == []
    shipped = parse_config(
        (Path(__file__).parent.parent / "config" / "bridge.yaml").read_text(),
        "bridge.yaml",
        {"BRIDGE_CLIENT_IDS": "a"},
    )
    assert deprecations(shipped.topology) == []


def test_check_config_warns_and_still_says_valid(tmp_path: Path) -> None:
    path = tmp_path / "bridge.yaml"
    path.write_text(config_text())
    result = cli("check-config", "--config", str(path))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"{path}: valid")
    assert lines[1:] == [f"warning: topology: {line}" for line in deprecations(
        parse_config(config_text(), "t.yaml", {}).topology
    )]  # fmt: skip


async def test_serve_warns_at_start_once_per_problem(aiohttp_client: Any) -> None:
    config = parse_config(config_text(), "t.yaml", {})
    with structlog.testing.capture_logs() as logs:
        await aiohttp_client(create_app(config, FakePublisher()))
    said = [entry["detail"] for entry in logs if entry["event"] == "topology_deprecated"]
    assert said == deprecations(config.topology)
    assert all(e["log_level"] == "warning" for e in logs if e["event"] == "topology_deprecated")
