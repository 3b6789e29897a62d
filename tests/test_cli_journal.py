"""``events-bridge journal`` in a subprocess, as an operator runs it: its help, its refusals (one
line, never a traceback), ``--dry-run``, a backfill onto the real broker, the kept position and
its lock. The journal is the stand-in of ``tests/adobe_journal.py``."""

from __future__ import annotations

import asyncio
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aio_pika
import orjson
import pytest

from bridge.checkpoint import Checkpoint
from tests.adobe_journal import JournalServer
from tests.helpers import SigningKey
from tests.processes import cli, daemon_env
from tests.rig import body_for, config_text

pytestmark = pytest.mark.broker


@dataclass
class Setup:
    prefix: str
    config: Path
    env: dict[str, str]
    state: Path
    amqp_url: str

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return cli("journal", "--config", str(self.config), *args, env=self.env)


@pytest.fixture
def server() -> Iterator[JournalServer]:
    with JournalServer(retry_after=0.1) as running:
        yield running


@pytest.fixture
def setup(amqp_url: str, tmp_path: Path, server: JournalServer) -> Iterator[Setup]:
    prefix = f"cli-journal.{uuid.uuid4().hex[:8]}"
    state = tmp_path / "journal"
    journal = f"""
journal:
  url: {server.journal_url}
  start: oldest
  limit: 4
  state_dir: {state}
  ims:
    token_url: {server.token_url}
    client_id: {server.client_id}
    client_secret: ${{BRIDGE_IMS_CLIENT_SECRET}}
    org_id: '{server.org_id}'
"""
    config = tmp_path / "bridge.yaml"
    config.write_text(config_text(prefix, extra=journal))
    env = daemon_env(tmp_path, SigningKey.generate(), amqp_url)
    env["BRIDGE_IMS_CLIENT_SECRET"] = server.client_secret
    made = Setup(prefix, config, env, state, amqp_url)
    asyncio.run(_declare(made))
    yield made
    asyncio.run(_forget(made))


async def _declare(setup: Setup) -> None:
    """The config's exchange and a queue on it, as `serve` would have declared them."""
    p = setup.prefix
    connection = await aio_pika.connect(setup.amqp_url)
    async with connection:
        channel = await connection.channel()
        unrouted = await channel.declare_exchange(f"{p}.unrouted", "fanout", durable=True)
        events = await channel.declare_exchange(
            f"{p}.events", "topic", durable=True, arguments={"alternate-exchange": f"{p}.unrouted"}
        )
        quorum: dict[str, Any] = {"x-queue-type": "quorum"}  # as the bridge declares them
        everything = await channel.declare_queue(f"{p}.all", durable=True, arguments=quorum)
        await everything.bind(events, "#")
        lost = await channel.declare_queue(f"{p}.unrouted", durable=True, arguments=quorum)
        await lost.bind(unrouted)


async def _forget(setup: Setup) -> None:
    p = setup.prefix
    connection = await aio_pika.connect(setup.amqp_url)
    async with connection:
        channel = await connection.channel()
        for queue in ("all", "unrouted"):
            await channel.queue_delete(f"{p}.{queue}")
        for exchange in ("events", "unrouted"):
            await channel.exchange_delete(f"{p}.{exchange}")


def taken(setup: Setup) -> list[str]:
    """The message ids in the test's queues (taken off them)."""

    async def drain() -> list[str]:
        connection = await aio_pika.connect(setup.amqp_url)
        found: list[str] = []
        async with connection:
            channel = await connection.channel()
            for name in ("all", "unrouted"):
                queue = await channel.get_queue(f"{setup.prefix}.{name}")
                while (message := await queue.get(fail=False, no_ack=True)) is not None:
                    found.append(message.message_id or "")
        return found

    return asyncio.run(drain())


def events(prefix: str, count: int) -> list[dict[str, Any]]:
    return [orjson.loads(body_for(f"{prefix}{i:03d}")) for i in range(count)]


def said(result: subprocess.CompletedProcess[str]) -> list[str]:
    """stderr's lines, but for the one warning the portable publish path owes its user (CI
    runs the suite on it: ``BRIDGE_PUBLISH_PATH=portable``, README "Operating it")."""
    return [
        line
        for line in result.stderr.strip().splitlines()
        if not (line.startswith("{") and '"publish_path_portable"' in line)
    ]


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in result.stderr, result.stderr
    (line,) = said(result)
    return line


def test_help_teaches_options_start_points_and_variables() -> None:
    result = cli("journal", "--help")
    assert result.returncode == 0
    text = result.stdout
    for option in (
        "--config",
        "--since",
        "--seek",
        "--oldest",
        "--latest",
        "--until-end",
        "--dry-run",
        "--limit",
    ):
        assert option in text, option
    for point in ("-PT2H", "oldest", "latest", "kept position", "7 days"):
        assert point in text, point
    for variable in (  # SPEC §10's table
        "BRIDGE_JOURNAL_URL",
        "BRIDGE_IMS_TOKEN_URL",
        "BRIDGE_IMS_CLIENT_ID",
        "BRIDGE_IMS_CLIENT_SECRET",
        "BRIDGE_IMS_ORG_ID",
        "BRIDGE_IMS_SCOPES",
        "BRIDGE_JOURNAL_STATE_DIR",
        "BRIDGE_JOURNAL_START",
    ):
        assert variable in text, variable


def test_without_a_journal_it_says_so_in_one_line(tmp_path: Path, amqp_url: str) -> None:
    config = tmp_path / "bridge.yaml"
    config.write_text(config_text("no-journal"))
    env = daemon_env(tmp_path, SigningKey.generate(), amqp_url)
    result = cli("journal", "--config", str(config), "--oldest", env=env)
    assert result.returncode == 1
    line = one_line(result)
    assert line.startswith("events-bridge: no journal to read")
    assert "BRIDGE_JOURNAL_URL" in line


@pytest.mark.parametrize("seek", ["2h", "-P8D", "PT2H", "-PT"])
def test_a_bad_seek_is_a_usage_error(seek: str) -> None:
    result = cli("journal", "--seek", seek)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    (error,) = [line for line in result.stderr.splitlines() if "error:" in line]
    assert "argument --seek: expected a negative ISO-8601 duration" in error


def test_since_and_oldest_cannot_be_given_together() -> None:
    result = cli("journal", "--since", "camel:1:2", "--oldest")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    (error,) = [line for line in result.stderr.splitlines() if "error:" in line]
    assert "not allowed with argument --since" in error


def test_dry_run_prints_each_event_and_publishes_nothing(
    setup: Setup, server: JournalServer
) -> None:
    server.add_many(events("d", 6))
    result = setup.run("--dry-run", "--oldest", "--until-end")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 6, result.stdout
    for n, line in enumerate(lines):
        event_id, code, arrow, exchange, key = line.split()
        assert (event_id, arrow, exchange) == (f"d{n:03d}", "->", f"{setup.prefix}.events")
        assert key.startswith(code + ".")
    assert "dry run: nothing published" in result.stderr
    # Nothing was published: resuming after the last event shown would skip them all.
    assert "resume with" not in result.stderr
    assert taken(setup) == []
    assert not setup.state.exists() or not list(setup.state.glob("position-*"))


def test_a_backfill_publishes_every_event_and_says_how_to_resume(
    setup: Setup, server: JournalServer
) -> None:
    sent = server.add_many(events("b", 10))
    result = setup.run("--oldest", "--until-end")
    assert result.returncode == 0, result.stderr
    assert sorted(taken(setup)) == [f"b{i:03d}" for i in range(10)]
    summary, hint = said(result)
    assert summary == f"journal: 10 events in 3 pages taken; position {sent[-1]}"
    assert hint.strip() == f"resume with: events-bridge journal --since {sent[-1]}"
    assert not list(setup.state.glob("position-*"))  # a backfill does not move serve's place


def test_without_a_start_option_it_resumes_from_the_kept_position(
    setup: Setup, server: JournalServer
) -> None:
    server.add_many(events("first", 5))
    done = setup.run("--until-end")
    assert done.returncode == 0, done.stderr
    assert sorted(taken(setup)) == [f"first{i:03d}" for i in range(5)]
    assert "resume with" not in done.stderr  # the position is kept: no need
    server.add_many(events("second", 3))
    again = setup.run("--until-end")
    assert again.returncode == 0, again.stderr
    assert sorted(taken(setup)) == [f"second{i:03d}" for i in range(3)]
    assert "3 events" in again.stderr


def test_a_dry_run_without_a_start_option_shows_what_the_next_run_would_take(
    setup: Setup, server: JournalServer
) -> None:
    server.add_many(events("first", 5))
    assert setup.run("--until-end").returncode == 0
    taken(setup)
    server.add_many(events("second", 3))
    dry = setup.run("--dry-run", "--until-end")
    assert dry.returncode == 0, dry.stderr
    assert [line.split()[0] for line in dry.stdout.splitlines()] == [
        f"second{i:03d}" for i in range(3)
    ]
    assert taken(setup) == []


def test_a_held_state_folder_is_one_line(setup: Setup, server: JournalServer) -> None:
    server.add_many(events("l", 2))
    holder = Checkpoint(setup.state, server.journal_url)
    holder.open()
    try:
        result = setup.run("--until-end")
    finally:
        holder.close()
    assert result.returncode == 1
    line = one_line(result)
    assert "is in use by another process" in line
    assert taken(setup) == []
    assert server.requests == []


def test_a_refused_credential_ends_with_one_line_without_the_secret(
    setup: Setup, server: JournalServer
) -> None:
    server.add_many(events("r", 2))
    wrong = "not-the-secret-" + uuid.uuid4().hex
    result = cli(
        "journal",
        "--config",
        str(setup.config),
        "--oldest",
        "--until-end",
        env={**setup.env, "BRIDGE_IMS_CLIENT_SECRET": wrong},
    )
    assert result.returncode == 1
    line = one_line(result)
    assert line.startswith("events-bridge: journal: IMS refused the credential with 400")
    assert wrong not in result.stderr + result.stdout
    assert taken(setup) == []


def test_seek_takes_a_negative_duration_as_its_own_word(
    setup: Setup, server: JournalServer
) -> None:
    """``--seek -PT2H`` as the help, README and SPEC write it (not only ``--seek=-PT2H``)."""
    old = datetime.now(UTC) - timedelta(hours=3)
    server.add(orjson.loads(body_for("old000")), at=old)
    server.add_many(events("new", 2))
    result = setup.run("--seek", "-PT2H", "--until-end", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert [line.split()[0] for line in result.stdout.splitlines()] == ["new000", "new001"]
    assert server.requests[0]["query"].get("seek") == "-PT2H"
