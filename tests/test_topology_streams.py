"""Stream queues in the topology: their retention keys, what a stream refuses (one line each,
with its line), and what the broker makes of them, declared and checked for real."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aio_pika
import aio_pika.abc
import pytest

from bridge.config import parse_config
from bridge.errors import ConfigError
from bridge.topology import STREAM_REFUSED_ARGUMENTS, max_age_seconds
from tests.processes import cli

HEAD = (
    "registrations:\n  - {name: main, path: /hook, client_ids: [a]}\n"
    "topology:\n  exchanges:\n    - {name: adobe.events}\n    - {name: adobe.unrouted}\n"
    "  queues:\n"
)  # the first queue's first line is line 8


def queues(text: str) -> list[str]:
    """The problems of a config whose ``topology.queues`` is ``text``."""
    with pytest.raises(ConfigError) as caught:
        parse_config(HEAD + text, "t.yaml", {})
    return caught.value.problems


def test_a_stream_with_its_retention_declares_these_arguments() -> None:
    config = parse_config(
        HEAD + "    - name: history\n      type: stream\n      max_age: 7D\n"
        "      max_length_bytes: 20_000_000_000\n"
        "      stream_max_segment_size_bytes: 100000000\n"
        "      arguments: {x-initial-cluster-size: 1}\n"
        "    - {name: capped, max_length_bytes: 1048576}\n",
        "t.yaml",
        {},
    )
    history, capped = config.topology.queues
    assert history.type == "stream"
    assert history.durable
    assert history.declare_arguments() == {
        "x-queue-type": "stream",
        "x-max-age": "7D",
        "x-max-length-bytes": 20_000_000_000,
        "x-stream-max-segment-size-bytes": 100_000_000,
        "x-initial-cluster-size": 1,
    }
    # A byte limit is a queue's too: quorum and classic queues take x-max-length-bytes.
    assert capped.declare_arguments() == {"x-queue-type": "quorum", "x-max-length-bytes": 1048576}


@pytest.mark.parametrize("age", ["1Y", "1M", "7D", "12h", "30m", "45s", "007m", "90D"])
def test_max_age_takes_what_rabbitmq_takes(age: str) -> None:
    config = parse_config(HEAD + f"    - {{name: s, type: stream, max_age: {age}}}\n", "t.yaml", {})
    assert config.topology.queues[0].max_age == age


AGE = (
    "expected a whole number > 0 and a unit: Y, M (30 days), D, h, m or s, as in 7D or 12h, "
    "got {!r} (t.yaml:10)"
)


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        *(
            (f"      max_age: {age}\n", "topology.queues[0].max_age: " + AGE.format(shown))
            for age, shown in [
                ("7d", "7d"),  # units are case-sensitive: m is minutes, M months
                ("0D", "0D"),
                ("7", "7"),
                ("1.5h", "1.5h"),
                ("'7 D'", "7 D"),
                ("-1D", "-1D"),
                ("7DD", "7DD"),
                ("1w", "1w"),
                ('"7D\\n"', "7D\n"),
            ]
        ),
        (
            "      max_length_bytes: 0\n",
            "topology.queues[0].max_length_bytes: expected a whole number from 1 to "
            "9223372036854775807, got '0' (t.yaml:10)",
        ),
        (
            "      max_length_bytes: 10GB\n",
            "topology.queues[0].max_length_bytes: expected a whole number from 1 to "
            "9223372036854775807, got '10GB' (t.yaml:10)",
        ),
        (
            "      stream_max_segment_size_bytes: 3000000001\n",
            "topology.queues[0].stream_max_segment_size_bytes: expected a whole number from 1 to "
            "3000000000, got '3000000001' (t.yaml:10)",
        ),
        (
            "      durable: false\n",
            "topology.queues[0].durable: streams are always durable (t.yaml:10)",
        ),
        (
            "      dead_letter_exchange: dlx\n",
            "topology.queues[0].dead_letter_exchange: streams do not dead-letter: a stream keeps "
            "every message (t.yaml:10)",
        ),
        (
            "      dead_letter_routing_key: dead\n",
            "topology.queues[0].dead_letter_routing_key: streams do not dead-letter: a stream "
            "keeps every message (t.yaml:10)",
        ),
        (
            "      message_ttl_ms: 60000\n",
            "topology.queues[0].message_ttl_ms: streams do not expire single messages: use "
            "max_age (t.yaml:10)",
        ),
        (
            "      max_length: 1000\n",
            "topology.queues[0].max_length: streams are not limited by message count: use "
            "max_length_bytes (t.yaml:10)",
        ),
        (
            "      overflow: reject-publish\n",
            "topology.queues[0].overflow: streams do not overflow: retention (max_age, "
            "max_length_bytes) drops the oldest segments (t.yaml:10)",
        ),
        (
            "      delivery_limit: 5\n",
            "topology.queues[0].delivery_limit: only quorum queues have a delivery limit "
            "(t.yaml:10)",
        ),
        (
            "      arguments:\n        x-message-ttl: 1000\n",
            "topology.queues[0].arguments.x-message-ttl: streams refuse this argument (t.yaml:11)",
        ),
        (
            "      arguments:\n        x-max-age: 7d\n",
            "topology.queues[0].arguments.x-max-age: expected a whole number > 0 and a unit: Y, "
            "M (30 days), D, h, m or s, as in 7D or 12h (t.yaml:11)",
        ),
    ],
)
def test_what_a_stream_cannot_have_is_one_line_with_its_line(lines: str, expected: str) -> None:
    found = queues("    - name: s\n      type: stream\n" + lines)
    assert found == [expected]


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        (
            "      max_age: 7D\n",
            "topology.queues[0].max_age: only streams have max_age (a queue's messages expire "
            "with message_ttl_ms) (t.yaml:10)",
        ),
        (
            "      stream_max_segment_size_bytes: 1000000\n",
            "topology.queues[0].stream_max_segment_size_bytes: only streams have segments "
            "(t.yaml:10)",
        ),
    ],
)
@pytest.mark.parametrize("queue_type", ["quorum", "classic"])
def test_stream_keys_on_a_queue_are_one_line(queue_type: str, lines: str, expected: str) -> None:
    assert queues(f"    - name: s\n      type: {queue_type}\n" + lines) == [expected]


def test_the_quorum_message_is_unchanged() -> None:
    assert queues("    - name: q\n      durable: false\n") == [
        "topology.queues[0].durable: quorum queues are always durable (t.yaml:9)"
    ]


# -- what the broker says: the refusals above are the broker's, found before it is asked ------


@pytest.fixture
async def connection(amqp_url: str) -> AsyncIterator[aio_pika.abc.AbstractConnection]:
    opened = await aio_pika.connect(amqp_url)
    async with opened:
        yield opened


async def _declare_stream(url: str, arguments: dict[str, Any], **flags: bool) -> str | None:
    """Declare a throwaway stream; the broker's refusal, or None; deleted either way.

    A connection of its own: some refusals close the whole connection (RabbitMQ 4 set to deny
    the deprecated transient queues answers a non-durable one with INTERNAL_ERROR)."""
    name = f"stream.probe.{uuid.uuid4().hex[:8]}"
    refusal = None
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        await channel.declare_queue(
            name,
            durable=flags.pop("durable", True),
            arguments={"x-queue-type": "stream", **arguments},
            **flags,
        )
    except aio_pika.exceptions.AMQPError as exc:
        refusal = str(exc)
    finally:
        await connection.close()
    async with await aio_pika.connect(url) as cleanup:
        await (await cleanup.channel()).queue_delete(name)
    return refusal


SAMPLES: dict[str, Any] = {  # a value each argument takes on a queue; 1 for the others
    "x-dead-letter-exchange": "dlx",
    "x-dead-letter-routing-key": "dead",
    "x-overflow": "reject-publish",
    "x-queue-mode": "lazy",
    "x-single-active-consumer": True,
}


@pytest.mark.parametrize("argument", STREAM_REFUSED_ARGUMENTS)
async def test_the_broker_refuses_each_argument_the_config_refuses(
    amqp_url: str, argument: str
) -> None:
    value = SAMPLES.get(argument, 1)
    refusal = await _declare_stream(amqp_url, {argument: value})
    assert refusal is not None
    assert f"invalid arg '{argument}'" in refusal


@pytest.mark.parametrize("flags", [{"durable": False}, {"exclusive": True}, {"auto_delete": True}])
async def test_the_broker_refuses_a_stream_that_is_not_durable_or_is_temporary(
    amqp_url: str, flags: dict[str, bool]
) -> None:
    # The topology has no exclusive or auto_delete key for queues, and refuses durable: false.
    assert await _declare_stream(amqp_url, {}, **flags) is not None


@pytest.mark.parametrize(
    "age", ["1Y", "1M", "7D", "12h", "30m", "45s", "007m", "7d", "0D", "1.5h", "7"]
)
async def test_max_age_the_config_takes_is_what_the_broker_takes(amqp_url: str, age: str) -> None:
    try:
        max_age_seconds(age)
        ours = True
    except ValueError:
        ours = False
    refusal = await _declare_stream(amqp_url, {"x-max-age": age})
    assert (refusal is None) == ours, refusal


# -- declared by `events-bridge declare`, and checked with passive: true ------------------------


def _config(tmp_path: Path, p: str, passive: bool, name: str, retention: str) -> Path:
    """A topology with the stream ``name`` bound to the events exchange."""
    stream = f"{{name: {name}, type: stream, {retention}}}"
    path = tmp_path / f"{uuid.uuid4().hex[:8]}.yaml"
    path.write_text(
        "registrations:\n  - {name: d, client_ids: [c]}\n"
        "broker:\n  url: ${BRIDGE_AMQP_URL}\n"
        f"  exchange: {p}.events\n  unrouted_exchange: {p}.unrouted\n"
        f"  unrouted_queue: {p}.unrouted\n"
        f"topology:\n  passive: {str(passive).lower()}\n"
        f"  exchanges:\n    - {{name: {p}.events, alternate_exchange: {p}.unrouted}}\n"
        f"    - {{name: {p}.unrouted, type: fanout}}\n"
        f"  queues:\n    - {{name: {p}.unrouted}}\n    - {stream}\n"
        f"  bindings:\n    - {{exchange: {p}.events, queue: {name}, routing_key: '#'}}\n"
        f"    - {{exchange: {p}.unrouted, queue: {p}.unrouted}}\n"
    )
    return path


async def test_declare_makes_the_stream_with_its_retention_and_passive_finds_it(
    tmp_path: Path, amqp_url: str, connection: aio_pika.abc.AbstractConnection
) -> None:
    p = f"topo.stream.{uuid.uuid4().hex[:8]}"
    retention = "max_age: 7D, max_length_bytes: 1000000000, stream_max_segment_size_bytes: 50000000"
    env = {"BRIDGE_AMQP_URL": amqp_url}
    declare = _config(tmp_path, p, False, f"{p}.history", retention)
    try:
        declared = cli("declare", "--config", str(declare), env=env)
        assert declared.returncode == 0, declared.stderr
        assert f"declared queue {p}.history (stream)" in declared.stdout
        again = cli("declare", "--config", str(declare), env=env)
        assert again.returncode == 0, again.stderr  # idempotent
        # The retention is on the broker: another max age is refused, not applied silently.
        channel = await connection.channel()
        with pytest.raises(aio_pika.exceptions.ChannelPreconditionFailed, match="x-max-age"):
            await channel.declare_queue(
                f"{p}.history",
                durable=True,
                arguments={
                    "x-queue-type": "stream",
                    "x-max-age": "8D",
                    "x-max-length-bytes": 1000000000,
                    "x-stream-max-segment-size-bytes": 50000000,
                },
            )
        passive = _config(tmp_path, p, True, f"{p}.history", retention)
        checked = cli("declare", "--config", str(passive), env=env)
        assert checked.returncode == 0, checked.stderr
        assert f"exists: queue {p}.history" in checked.stdout
        absent = _config(tmp_path, p, True, f"{p}.nothing", retention)
        missing = cli("declare", "--config", str(absent), env=env)
        assert missing.returncode == 1
        assert missing.stderr.strip() == (
            f"events-bridge: queue '{p}.nothing' missing on the broker (topology.passive is true)"
        )
    finally:
        cleanup = await connection.channel()
        for queue in ("history", "unrouted"):
            await cleanup.queue_delete(f"{p}.{queue}")
        for exchange in ("events", "unrouted"):
            await cleanup.exchange_delete(f"{p}.{exchange}")


def test_the_stream_commented_in_the_shipped_config_is_valid_uncommented() -> None:
    text = (Path(__file__).parent.parent / "config" / "bridge.yaml").read_text()
    example = [line for line in text.splitlines() if "adobe.history" in line]
    assert len(example) == 2
    for line in example:
        text = text.replace(line, line.replace("# - ", "- ", 1))
    config = parse_config(text, "bridge.yaml", {"BRIDGE_CLIENT_IDS": "a"})
    history = config.topology.queues[-1]
    assert (history.name, history.type, history.max_age) == ("adobe.history", "stream", "7D")
    assert config.topology.bindings[-1].queue == "adobe.history"
