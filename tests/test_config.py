"""Config: env substitution, typed values, and problems that name their YAML path and line."""

from __future__ import annotations

from pathlib import Path

import pytest

from bridge.config import MAX_KEY_CACHE_SECONDS, load_config, parse_config
from bridge.errors import ConfigError

SHIPPED = Path(__file__).parent.parent / "config" / "bridge.yaml"
ENV = {"BRIDGE_CLIENT_IDS": "id-one, id-two"}

MINIMAL = """\
registrations:
  - name: main
    path: /hook
    client_ids: [a]
"""


def problems(text: str, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "t.yaml", env or {})
    return caught.value.problems


def test_shipped_config_reads_the_spec_variables_with_their_defaults() -> None:
    config = load_config(SHIPPED, ENV)
    assert config.broker.url == "amqp://guest:guest@127.0.0.1:5672/"
    assert (config.server.host, config.server.port) == ("127.0.0.1", 8080)
    assert config.registrations[0].client_ids == ("id-one", "id-two")
    assert config.verification.key_base_url == "https://static.adobeioevents.com"
    assert config.outbox.dir == ".local/outbox"
    assert config.logging.format == "auto"
    assert config.broker.exchange == "adobe.events"
    assert config.broker.unrouted_exchange == config.broker.unrouted_queue == "adobe.unrouted"


def test_shipped_config_takes_every_variable_from_the_environment() -> None:
    env = {
        **ENV,
        "BRIDGE_AMQP_URL": "amqps://u:p@broker:5671/vh",
        "BRIDGE_HOST": "0.0.0.0",
        "BRIDGE_PORT": "9000",
        "BRIDGE_KEY_BASE_URL": "file:///keys",
        "BRIDGE_OUTBOX_DIR": "/var/spool/bridge",
        "BRIDGE_LOG_FORMAT": "json",
    }
    config = load_config(SHIPPED, env)
    assert config.broker.url == "amqps://u:p@broker:5671/vh"
    assert (config.server.host, config.server.port) == ("0.0.0.0", 9000)
    assert config.verification.key_base_url == "file:///keys"
    assert config.outbox.dir == "/var/spool/bridge"
    assert config.logging.format == "json"


def test_shipped_config_refuses_to_start_without_client_ids() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(SHIPPED, {})
    (problem,) = caught.value.problems
    assert problem.startswith(
        "registrations[0].client_ids: environment variable "
        "BRIDGE_CLIENT_IDS is not set (bridge.yaml:"
    )


def test_minimal_config_gets_safe_defaults() -> None:
    config = parse_config(MINIMAL, "t.yaml", {})
    assert config.verification.enabled is True
    assert config.verification.key_cache_seconds == MAX_KEY_CACHE_SECONDS
    assert config.server.max_body_bytes == 10 * 1024 * 1024
    assert config.registrations[0].path == "/hook"


@pytest.mark.parametrize(
    ("text", "env", "expected"),
    [
        ("a: ${X:-fallback}\n", {}, "fallback"),
        ("a: ${X:-fallback}\n", {"X": ""}, "fallback"),
        ("a: ${X:-fallback}\n", {"X": "set"}, "set"),
        ("a: pre-${X}-post\n", {"X": "mid"}, "pre-mid-post"),
        ("a: $${X}\n", {"X": "no"}, "${X}"),
    ],
)
def test_variables_are_replaced_inside_values(
    text: str, env: dict[str, str], expected: str
) -> None:
    body = text.replace("a:", "  host:")
    config = parse_config("server:\n" + body + MINIMAL, "t.yaml", env)
    assert config.server.host == expected


def test_a_variable_cannot_inject_yaml_structure() -> None:
    text = "server:\n  host: ${X}\n" + MINIMAL
    config = parse_config(text, "t.yaml", {"X": "a\nport: 1"})
    assert config.server.host == "a\nport: 1"
    assert config.server.port == 8080


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "bogus: 1\n" + MINIMAL,
            "bogus: unknown key (allowed here: broker, dedup, journal, logging, metrics, outbox, "
            "registrations, routes, server, topology, verification) (t.yaml:1)",
        ),
        (
            "server:\n  port: 70000\n" + MINIMAL,
            "server.port: expected a whole number from 0 to 65535, got '70000' (t.yaml:2)",
        ),
        (
            "broker:\n  publish_timeout: soon\n" + MINIMAL,
            "broker.publish_timeout: expected a number from 0.1 to 9, got 'soon' (t.yaml:2)",
        ),
        (
            "broker:\n  url: http://x\n" + MINIMAL,
            "broker.url: expected amqp:// or amqps:// URLs with a host, separated by commas, got 'http://x'",
        ),
        (
            "verification:\n  enabled: maybe\n" + MINIMAL,
            "verification.enabled: expected true or false, got 'maybe' (t.yaml:2)",
        ),
        (
            "verification:\n  key_cache_seconds: 90000\n" + MINIMAL,
            "verification.key_cache_seconds: expected a number from 0 to 86400, "
            "got '90000' (t.yaml:2)",
        ),
        (
            "verification:\n  key_base_url: https://evil/x/\n" + MINIMAL,
            "verification.key_base_url: expected a value matching",
        ),
        (
            "logging:\n  format: xml\n" + MINIMAL,
            "logging.format: expected one of auto, json, console, got 'xml' (t.yaml:2)",
        ),
        (
            "registrations: []\n",
            "registrations: expected a non-empty list of registrations (t.yaml:1)",
        ),
        ("server: {}\n", "registrations: at least one registration is required"),
        (
            "registrations:\n  - name: a\n    client_ids: [x]\n    colour: red\n",
            "registrations[0].colour: unknown key",
        ),
        (
            "registrations:\n  - name: a\n    path: /healthz\n    client_ids: [x]\n",
            "registrations[0].path: /healthz is reserved (t.yaml:3)",
        ),
        ("registrations:\n  - name: a\n    path: /w\n", "registrations[0].client_ids: required"),
        (
            "registrations:\n  - {name: a, client_ids: [x]}\n"
            "  - {name: a, path: /b, client_ids: [y]}\n",
            "registrations[1].name: duplicate 'a' (t.yaml:3)",
        ),
        (
            "server:\n  host: [1, 2]\n" + MINIMAL,
            "server.host: expected a single value, not a list or mapping (t.yaml:2)",
        ),
        ("server: [\n", "(top): not valid YAML"),
        ("server:\n  port: 1\n  port: 2\n" + MINIMAL, "server.port: duplicate key (t.yaml:3)"),
        (
            "broker:\n  url: amqp://h:abc/\n" + MINIMAL,
            "broker.url: expected amqp:// or amqps:// URLs with a host, separated by commas, got 'amqp://h:abc/'",
        ),
        (
            "server:\n  shutdown_timeout: 2\n" + MINIMAL,
            "server.shutdown_timeout: must be at least server.answer_deadline",
        ),
        ("server:\n  answer_deadline: 9\n" + MINIMAL, "server.answer_deadline: expected a number"),
        (
            "broker:\n  exchange: a\n  unrouted_exchange: a\n" + MINIMAL,
            "broker.unrouted_exchange: must differ from broker.exchange (t.yaml:3)",
        ),
    ],
)
def test_each_problem_names_its_path_and_line(text: str, expected: str) -> None:
    found = problems(text)
    assert any(p.startswith(expected) for p in found), found


TOPOLOGY = "topology:\n  exchanges:\n    - {name: adobe.events}\n    - {name: adobe.unrouted}\n"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "server:\n  answer_deadline: 4\n  body_timeout: 4\n" + MINIMAL,
            "server.body_timeout: must be below server.answer_deadline, so a late body still "
            "gets its 503 in time (t.yaml:3)",
        ),
        (  # body_timeout left at its default: the line of the deadline that undercuts it
            "server:\n  answer_deadline: 4\n" + MINIMAL,
            "server.body_timeout: must be below server.answer_deadline, so a late body still "
            "gets its 503 in time (t.yaml:2)",
        ),
        (
            "server:\n  shutdown_timeout: 2\n" + MINIMAL,
            "server.shutdown_timeout: must be at least server.answer_deadline, so requests in "
            "flight are answered (t.yaml:2)",
        ),
        (
            "broker:\n  exchange: adobe.unrouted\n" + MINIMAL,
            "broker.unrouted_exchange: must differ from broker.exchange (t.yaml:2)",
        ),
        (
            "server:\n  answer_deadline: 6\nbroker:\n  publish_timeout: 5.5\n" + MINIMAL,
            "broker.publish_timeout: must be at least 1 s below server.answer_deadline (6), so an "
            "event the broker does not confirm still has time to reach the outbox (t.yaml:4)",
        ),
        (  # publish_timeout left at its default: the line of the deadline
            "server:\n  answer_deadline: 5.5\nbroker:\n  heartbeat: 5\n" + MINIMAL,
            "broker.publish_timeout: must be at least 1 s below server.answer_deadline (5.5), so "
            "an event the broker does not confirm still has time to reach the outbox (t.yaml:2)",
        ),
        (
            "broker:\n  unrouted_exchange: parked\n" + TOPOLOGY + MINIMAL,
            "broker.unrouted_exchange: exchange 'parked' (where events no rule takes go) is not "
            "in topology.exchanges (t.yaml:2)",
        ),
        (  # unrouted_exchange left at its default: the line of the list that lacks it
            "topology:\n  exchanges:\n    - {name: adobe.events}\n" + MINIMAL,
            "broker.unrouted_exchange: exchange 'adobe.unrouted' (where events no rule takes go) "
            "is not in topology.exchanges (t.yaml:3)",
        ),
        (
            "routes:\n  - name: a\n    targets:\n      - exchange: adobe.events\n"
            "      - exchange: nowhere\n" + MINIMAL,
            "routes[0].targets[1].exchange: exchange 'nowhere' is not in topology.exchanges "
            "(t.yaml:5)",
        ),
        (
            "registrations:\n  - name: a\n    client_ids: [x]\n    routes:\n"
            "      - targets: [{exchange: nowhere}]\n",
            "registrations[0].routes[0].targets[0].exchange: exchange 'nowhere' is not in "
            "topology.exchanges (t.yaml:5)",
        ),
        (  # the default rule, which publishes to broker.exchange
            "broker:\n  exchange: events\ntopology:\n  exchanges:\n"
            "    - {name: adobe.unrouted, type: fanout}\n" + MINIMAL,
            "routes[0].targets[0].exchange: exchange 'events' is not in topology.exchanges "
            "(t.yaml:2)",
        ),
        (
            TOPOLOGY + "  queues: [{name: q}]\n  bindings:\n"
            "    - {exchange: adobe.events, queue: q}\n    - {exchange: other, queue: q}\n"
            + MINIMAL,
            "topology.bindings[1].exchange: exchange 'other' is not in topology.exchanges "
            "(t.yaml:8)",
        ),
        (
            TOPOLOGY + "  queues: [{name: q}]\n  bindings:\n"
            "    - exchange: adobe.events\n      queue: nope\n" + MINIMAL,
            "topology.bindings[0].queue: queue 'nope' is not in topology.queues (t.yaml:8)",
        ),
        (
            TOPOLOGY + "    - name: more\n      alternate_exchange: gone\n" + MINIMAL,
            "topology.exchanges[2].alternate_exchange: exchange 'gone' is not in "
            "topology.exchanges (t.yaml:6)",
        ),
        (
            TOPOLOGY + "  queues:\n    - {name: q}\n    - {name: amq.q}\n" + MINIMAL,
            "topology.queues[1].name: 'amq.q': amq.* names belong to the broker and cannot be "
            "declared (use passive: true to rely on existing ones) (t.yaml:7)",
        ),
        (
            TOPOLOGY + "  queues:\n    - name: q\n      durable: false\n" + MINIMAL,
            "topology.queues[0].durable: quorum queues are always durable (t.yaml:7)",
        ),
        (
            TOPOLOGY
            + "  queues:\n    - name: q\n      type: classic\n      delivery_limit: 3\n"
            + MINIMAL,
            "topology.queues[0].delivery_limit: only quorum queues have a delivery limit "
            "(t.yaml:8)",
        ),
        (
            TOPOLOGY
            + "  queues:\n    - name: q\n      arguments:\n        x-max-length: 1.5\n"
            + MINIMAL,
            "topology.queues[0].arguments.x-max-length: expected a string, true/false or a whole "
            "number, got 1.5 (t.yaml:8)",
        ),
        (
            "routes:\n  - name: a\n    action: drop\n    targets: [{exchange: adobe.events}]\n"
            + MINIMAL,
            "routes[0].targets: a drop rule has no targets (t.yaml:4)",
        ),
        (
            "registrations:\n  - {name: a, path: /x, client_ids: [x]}\n"
            "  - name: b\n    path: /x\n    client_ids: [y]\n",
            "registrations[1].path: duplicate '/x' (t.yaml:4)",
        ),
        (
            "registrations:\n  - {name: a, client_ids: [x]}\n  - {name: b, client_ids: [y]}\n",
            "registrations[1].path: duplicate '/webhook' (t.yaml:3)",
        ),
    ],
)
def test_problems_found_by_comparing_fields_name_the_offending_line(
    text: str, expected: str
) -> None:
    found = problems(text)
    assert expected in found, found


def test_every_problem_is_reported_at_once() -> None:
    found = problems("server:\n  port: x\n  host: ''\nlogging:\n  level: loud\n" + MINIMAL)
    assert len(found) == 3


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the config file"):
        load_config(tmp_path / "absent.yaml")


def test_config_is_frozen() -> None:
    config = parse_config(MINIMAL, "t.yaml", {})
    with pytest.raises(AttributeError):
        config.server.port = 1  # type: ignore[misc]


def test_unset_variables_in_sections_not_read_are_no_problem() -> None:
    config = load_config(SHIPPED, {}, sections=("broker",))
    assert config.broker.exchange == "adobe.events"


def test_file_root_key_base_url_stays_a_file_url() -> None:
    config = parse_config("verification:\n  key_base_url: file:///\n" + MINIMAL, "t.yaml", {})
    assert config.verification.key_base_url == "file:///"
    config = parse_config("verification:\n  key_base_url: file:///k/\n" + MINIMAL, "t.yaml", {})
    assert config.verification.key_base_url == "file:///k"


def test_shipped_routes_and_topology_keep_the_spec_default() -> None:
    from bridge.rules import default_routes
    from bridge.topology import default_topology

    config = load_config(SHIPPED, ENV)
    assert config.routes == default_routes("adobe.events")
    shipped, default = (
        config.topology,
        default_topology("adobe.events", "adobe.unrouted", "adobe.unrouted"),
    )
    assert set(shipped.exchanges) == set(default.exchanges)
    assert shipped.queues == default.queues
    assert shipped.bindings == default.bindings


@pytest.mark.parametrize("path", sorted((SHIPPED.parent).rglob("*.yaml")), ids=lambda p: p.name)
def test_every_config_in_the_repo_is_valid(path: Path) -> None:
    config = load_config(path, ENV)
    assert config.registrations
