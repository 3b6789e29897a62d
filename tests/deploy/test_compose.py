"""The laptop compose file (deploy/compose.yaml), checked offline with `docker-compose config`.

`config` validates the file against the Compose schema and prints it resolved (variables
substituted, paths made absolute); it needs no engine, and the tests prove it by pointing
DOCKER_HOST at a socket that does not exist. A hermetic empty --env-file keeps a developer's
deploy/.env out. The resolved file must keep the image contract of SPEC §7: read-only root, no
capabilities, no new privileges, ports on 127.0.0.1 only, the outbox on a named volume, health
checks and start order, and a stop grace period that covers shutdown plus the outbox drain.
Debian's docker-compose 1.29.2 is the tool here; `docker compose` v2 is checked too where present.
"""

from __future__ import annotations

import copy
import functools
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "deploy" / "compose.yaml"
SHIPPED_CONFIG = ROOT / "config" / "bridge.yaml"
OUTBOX = "/var/lib/events-bridge/outbox"
JOURNAL = "/var/lib/events-bridge/journal"
OUR_VARIABLES = (
    "EVENTS_BRIDGE_IMAGE",
    "RABBITMQ_IMAGE",
    "RABBITMQ_PASSWORD",
    "BRIDGE_CLIENT_IDS",
    "BRIDGE_KEY_BASE_URL",
    "BRIDGE_DEV_KEYS",
    "BRIDGE_PUBLISHED_PORT",
    "BRIDGE_JOURNAL_URL",
    "BRIDGE_JOURNAL_START",
    "BRIDGE_IMS_CLIENT_ID",
    "BRIDGE_IMS_CLIENT_SECRET",
    "BRIDGE_IMS_ORG_ID",
    "BRIDGE_JOURNAL_PROXY",
)

Service = dict[str, Any]


def _v2_available() -> bool:
    if shutil.which("docker") is None:
        return False
    probe = ["docker", "compose", "version"]
    return subprocess.run(probe, capture_output=True, timeout=30, check=False).returncode == 0


TOOLS = [
    pytest.param(
        ["docker-compose"],
        id="docker-compose",
        marks=pytest.mark.skipif(
            shutil.which("docker-compose") is None, reason="docker-compose is not installed"
        ),
    ),
    pytest.param(
        ["docker", "compose"],
        id="docker-compose-v2",
        marks=pytest.mark.skipif(not _v2_available(), reason="no `docker compose` v2 plugin"),
    ),
]


def run_config(
    tool: list[str], folder: Path, overrides: dict[str, str], file: Path = COMPOSE
) -> subprocess.CompletedProcess[str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in OUR_VARIABLES and not k.startswith(("DOCKER_", "COMPOSE_"))
    }
    env["DOCKER_HOST"] = f"unix://{folder}/no-engine-here.sock"  # config must not need one
    env.update(overrides)
    empty = folder / "empty.env"
    empty.write_text("")
    command = [*tool, "--env-file", str(empty), "-f", str(file), "config"]
    return subprocess.run(
        command, capture_output=True, text=True, timeout=60, check=False, env=env, cwd=folder
    )


@functools.cache
def _resolved(tool: tuple[str, ...], overrides: tuple[tuple[str, str], ...]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="compose-config-") as folder:
        result = run_config(list(tool), Path(folder), dict(overrides))
    assert result.returncode == 0, result.stderr
    doc = yaml.safe_load(result.stdout)
    assert isinstance(doc, dict)
    return doc


def resolved(tool: list[str], **overrides: str) -> dict[str, Any]:
    """The file as `config` prints it (each combination run once per session)."""
    return copy.deepcopy(_resolved(tuple(tool), tuple(sorted(overrides.items()))))


def seconds(value: object) -> float:
    """A compose duration ("45s", "1m30s", "1m") in seconds."""
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", str(value))
    assert parts, value
    return sum(float(number) * units[unit] for number, unit in parts)


def ports(service: Service) -> list[tuple[str, str, str]]:
    """(host ip, published, target) of each port, from the short or the long syntax."""
    found = []
    for port in service.get("ports", []):
        if isinstance(port, dict):
            found.append((port.get("host_ip", ""), str(port["published"]), str(port["target"])))
        else:
            parts = str(port).split("/")[0].split(":")
            assert len(parts) == 3, f"port {port} is not bound to an address"
            found.append((parts[0], parts[1], parts[2]))
    return found


def mounts(service: Service) -> dict[str, tuple[str, bool]]:
    """Target to (source, read-only) of each volume, from the short or the long syntax."""
    found = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            found[volume["target"]] = (volume["source"], bool(volume.get("read_only")))
        else:
            source, target, *mode = str(volume).split(":")
            found[target] = (source, "ro" in "".join(mode).split(","))
    return found


def conditions(service: Service) -> dict[str, str]:
    depends = service.get("depends_on", {})
    assert isinstance(depends, dict), "depends_on without conditions"
    return {name: spec["condition"] for name, spec in depends.items()}


def shipped_default(variable: str) -> float:
    found = re.search(rf"\$\{{{variable}:-(\d+(?:\.\d+)?)\}}", SHIPPED_CONFIG.read_text())
    assert found, f"config/bridge.yaml has no default for {variable}"
    return float(found.group(1))


def test_file_is_for_every_compose() -> None:
    """No top-level `name:` (docker-compose 1.29.2 rejects it) and no obsolete `version:`."""
    raw = yaml.safe_load(COMPOSE.read_text())
    assert set(raw) == {"services", "volumes"}


@pytest.mark.parametrize("tool", TOOLS)
def test_config_resolves_offline_with_image_overrides(tool: list[str]) -> None:
    doc = resolved(
        tool,
        EVENTS_BRIDGE_IMAGE="localhost/events-bridge:9.9.9",
        RABBITMQ_IMAGE="localhost/rabbitmq:4",
    )
    services = doc["services"]
    assert set(services) == {"rabbitmq", "events-bridge", "consumer"}
    assert services["rabbitmq"]["image"] == "localhost/rabbitmq:4"
    assert services["events-bridge"]["image"] == "localhost/events-bridge:9.9.9"
    assert services["consumer"]["image"] == "localhost/events-bridge:9.9.9"


@pytest.mark.parametrize("tool", TOOLS)
def test_defaults(tool: list[str]) -> None:
    services = resolved(tool)["services"]
    assert services["rabbitmq"]["image"] == "docker.io/library/rabbitmq:4-management"
    assert services["events-bridge"]["image"] == "events-bridge:latest"
    env = services["events-bridge"]["environment"]
    assert env["BRIDGE_CLIENT_IDS"] == "events-bridge-dev"
    assert env["BRIDGE_KEY_BASE_URL"] == "file:///keys"
    source, read_only = mounts(services["events-bridge"])["/keys/prod"]
    assert read_only
    assert source == str(ROOT / ".local" / "keys" / "prod")  # the public half only


@pytest.mark.parametrize("tool", TOOLS)
def test_bridge_is_hardened(tool: list[str]) -> None:
    services = resolved(tool)["services"]
    for name in ("events-bridge", "consumer"):
        service = services[name]
        assert service["read_only"] is True, name
        assert service["cap_drop"] == ["ALL"], name
        assert any(o.startswith("no-new-privileges") for o in service["security_opt"]), name
        assert "privileged" not in service, name
        assert "user" not in service, name  # the image's own non-root user (10001)


@pytest.mark.parametrize("tool", TOOLS)
def test_ports_are_on_loopback_only(tool: list[str]) -> None:
    services = resolved(tool)["services"]
    for name, service in services.items():
        for host_ip, _, _ in ports(service):
            assert host_ip == "127.0.0.1", name
    assert ("127.0.0.1", "8080", "8080") in ports(services["events-bridge"])


@pytest.mark.parametrize("tool", TOOLS)
def test_outbox_is_a_named_volume(tool: list[str]) -> None:
    doc = resolved(tool)
    source, read_only = mounts(doc["services"]["events-bridge"])[OUTBOX]
    assert not read_only
    assert not source.startswith(("/", ".")), f"{source} is a host path, not a named volume"
    assert source in doc["volumes"]
    env = doc["services"]["events-bridge"]["environment"]
    assert env.get("BRIDGE_OUTBOX_DIR", OUTBOX) == OUTBOX


@pytest.mark.parametrize("tool", TOOLS)
def test_journal_is_off_and_its_position_on_a_named_volume(tool: list[str]) -> None:
    doc = resolved(tool)
    bridge = doc["services"]["events-bridge"]
    source, read_only = mounts(bridge)[JOURNAL]
    assert not read_only
    assert source in doc["volumes"]
    assert source != mounts(bridge)[OUTBOX][0]
    env = bridge["environment"]
    assert env["BRIDGE_JOURNAL_STATE_DIR"] == JOURNAL
    assert env["BRIDGE_JOURNAL_URL"] in ("", None)  # empty: no journal
    assert env["BRIDGE_JOURNAL_START"] == "latest"
    on = resolved(
        tool, BRIDGE_JOURNAL_URL="https://events.adobe.io/j", BRIDGE_IMS_CLIENT_SECRET="s3cret"
    )["services"]["events-bridge"]["environment"]
    assert on["BRIDGE_JOURNAL_URL"] == "https://events.adobe.io/j"
    assert on["BRIDGE_IMS_CLIENT_SECRET"] == "s3cret"
    referenced = set(re.findall(r"\$\{(BRIDGE_[A-Z_]+)", SHIPPED_CONFIG.read_text()))
    assert {n for n in env if n.startswith(("BRIDGE_JOURNAL_", "BRIDGE_IMS_"))} <= referenced


@pytest.mark.parametrize("tool", TOOLS)
def test_start_order_and_health(tool: list[str]) -> None:
    services = resolved(tool)["services"]
    assert conditions(services["events-bridge"]) == {"rabbitmq": "service_healthy"}
    assert conditions(services["consumer"])["events-bridge"] in {
        "service_healthy",
        "service_started",
    }
    bridge_check = services["events-bridge"]["healthcheck"]["test"]
    assert bridge_check[0] == "CMD"
    assert bridge_check[1] == "/usr/local/bin/events-bridge-healthcheck"
    rabbit_check = services["rabbitmq"]["healthcheck"]["test"]
    assert "rabbitmq-diagnostics" in rabbit_check
    assert {"ping", "check_port_connectivity"} & set(rabbit_check)


@pytest.mark.parametrize("tool", TOOLS)
def test_stop_grace_covers_shutdown_and_drain(tool: list[str]) -> None:
    bridge = resolved(tool)["services"]["events-bridge"]
    budget = shipped_default("BRIDGE_SHUTDOWN_TIMEOUT") + shipped_default("BRIDGE_DRAIN_SECONDS")
    assert budget >= 30
    assert seconds(bridge["stop_grace_period"]) >= budget + 10
    assert "init" not in bridge  # the daemon is PID 1 and handles SIGTERM itself


@pytest.mark.parametrize("tool", TOOLS)
def test_broker_credentials_agree(tool: list[str]) -> None:
    """The bridge and the consumer log in as the user RabbitMQ creates on its first boot, and
    the password can be changed in one place."""
    for overrides in ({}, {"RABBITMQ_PASSWORD": "s3cret", "BRIDGE_CLIENT_IDS": "a,b"}):
        services = resolved(tool, **overrides)["services"]
        broker = services["rabbitmq"]["environment"]
        expected = (
            f"amqp://{broker['RABBITMQ_DEFAULT_USER']}:{broker['RABBITMQ_DEFAULT_PASS']}"
            "@rabbitmq:5672/"
        )
        assert services["events-bridge"]["environment"]["BRIDGE_AMQP_URL"] == expected
        assert services["consumer"]["environment"]["BRIDGE_AMQP_URL"] == expected
        if overrides:
            assert broker["RABBITMQ_DEFAULT_PASS"] == "s3cret"
            assert services["events-bridge"]["environment"]["BRIDGE_CLIENT_IDS"] == "a,b"


@pytest.mark.parametrize("tool", TOOLS)
def test_consumer_runs_the_shipped_example(tool: list[str]) -> None:
    consumer = resolved(tool)["services"]["consumer"]
    assert consumer["entrypoint"] == ["/opt/events-bridge/bin/python"]
    assert consumer["command"] == ["/opt/events-bridge/examples/consumer.py"]


@pytest.mark.parametrize("tool", TOOLS)
def test_config_has_teeth(tool: list[str], tmp_path: Path) -> None:
    """An invalid file fails `config`, so the tests above can fail."""
    broken = tmp_path / "compose.yaml"
    broken.write_text(COMPOSE.read_text().replace("read_only: true", "read_only: sometimes", 1))
    result = run_config(tool, tmp_path, {}, file=broken)
    assert result.returncode != 0
    assert "read_only" in result.stderr
