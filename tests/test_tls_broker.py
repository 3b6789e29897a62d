"""TLS to the broker (SPEC §8) against a real RabbitMQ whose ``amqps`` listener demands a client
certificate (``tests/tlsbroker.py``), with certificates made at test time: events go through,
each way a handshake can fail keeps the daemon alive and says why in one sentence, EXTERNAL logs
in with the certificate alone, and no password shows in logs, ``/readyz`` or ``/metrics``."""

from __future__ import annotations

import asyncio
import json
import os
import re
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aio_pika
import orjson
import pytest

from bridge.config_types import BrokerTls
from bridge.nodes import Node
from bridge.tls import client_context, tls_problem
from tests.certs import Pair
from tests.helpers import CLIENT_ID, EVENTS, SigningKey
from tests.processes import Daemon, cli, daemon_env
from tests.test_cli import isolated_config
from tests.tlsbroker import (
    AMQP_PORT,
    AMQPS_PORT,
    EXTERNAL_USER,
    NAMED,
    PASSWORD,
    USER,
    TlsBroker,
    running_tls_broker,
    unavailable,
)

LIGHTROOM = orjson.loads((EVENTS / "imaging_lightroom-job-status_succeeded.json").read_bytes())
NODE_NAME = f"127.0.0.1:{AMQPS_PORT}"
# What the operator reads in broker_connect_failed and /readyz (bridge/tls.py).
UNTRUSTED = "the broker's certificate is not signed by a trusted CA (broker.tls.ca_file)"
EXPIRED = "the broker's certificate has expired"
WRONG_NAME = (
    "the broker's certificate is not for the name checked "
    "(the URL's host, or broker.tls.server_name)"
)
NO_CLIENT_CERT = "the broker requires a client certificate (broker.tls.cert_file, key_file)"
CLIENT_CA_UNKNOWN = "the broker does not trust our client certificate's CA"


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsBroker]:
    """The private TLS node, started once for these tests (a start costs about 5 s) and stopped
    after them (only this module uses it: it does not idle through the rest of the suite)."""
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    with running_tls_broker(tmp_path_factory.mktemp("tls-broker")) as broker:
        yield broker


def start_daemon(
    tmp_path: Path,
    url: str,
    *,
    ca: Path | None,
    pair: Pair | None,
    outbox: str = "fallback",
    server_name: str = "",
) -> tuple[Daemon, SigningKey, str]:
    """``serve`` with the shipped config and its TLS variables; the daemon, its signer and the
    queue its events land in (the shipped topology: everything in ``<prefix>.unrouted``)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    config = isolated_config(tmp_path)
    text = config.read_text()
    key_line = "    key_file: ${BRIDGE_AMQP_KEY_FILE:-}"
    assert "  mode: fallback " in text, "the shipped config's outbox.mode changed"
    assert key_line in text, "the shipped config's broker.tls.key_file changed"
    text = text.replace("  mode: fallback ", f"  mode: {outbox} ")
    if server_name:
        text = text.replace(key_line, f"{key_line}\n    server_name: {server_name}")
    config.write_text(text)
    prefix = re.search(r"(cli\.\d+)\.events", text)
    assert prefix is not None
    signer = SigningKey.generate()
    env = {
        **daemon_env(tmp_path, signer, url),
        "BRIDGE_AMQP_CA_FILE": str(ca or ""),
        "BRIDGE_AMQP_CERT_FILE": str(pair.cert) if pair else "",
        "BRIDGE_AMQP_KEY_FILE": str(pair.key) if pair else "",
    }
    return Daemon(config, env), signer, f"{prefix.group(1)}.unrouted"


def get(daemon: Daemon, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(daemon.url + path, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def post(daemon: Daemon, signer: SigningKey, event_id: str) -> int:
    body = orjson.dumps({**LIGHTROOM, "event_id": event_id, "recipientclientid": CLIENT_ID})
    request = urllib.request.Request(
        daemon.url + "/webhook", data=body, method="POST", headers=signer.headers(body)
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        status: int = response.status
        return status


async def read_back(broker: TlsBroker, queue: str, count: int, url: str = "") -> list[str]:
    """The message ids in ``queue``, read over TLS with our client certificate."""
    context = ssl.create_default_context(cafile=str(broker.certs.ca))
    context.load_cert_chain(broker.certs.client.cert, broker.certs.client.key)
    connection = await aio_pika.connect(url or broker.url(), ssl_context=context, timeout=10)
    ids: list[str] = []
    async with connection:
        channel = await connection.channel()
        source = await channel.get_queue(queue, ensure=False)
        deadline = time.monotonic() + 10
        while len(ids) < count and time.monotonic() < deadline:
            message = await source.get(fail=False, no_ack=True)
            if message is None:
                await asyncio.sleep(0.05)
                continue
            ids.append(message.message_id or "")
    return ids


def failures(daemon: Daemon, at_least: int, seconds: float = 15) -> list[dict[str, Any]]:
    """The daemon's ``broker_connect_failed`` lines, once there are ``at_least``."""
    deadline = time.monotonic() + seconds
    while True:
        assert daemon.process.poll() is None, daemon.log_file.read_text()
        found = [line for line in daemon.logs() if line["event"] == "broker_connect_failed"]
        if len(found) >= at_least:
            return found
        assert time.monotonic() < deadline, f"{len(found)} broker_connect_failed lines only"
        time.sleep(0.1)


def failed_connects(daemon: Daemon) -> float:
    _, text = get(daemon, "/metrics")
    found = re.search(r'^bridge_broker_connects_total\{result="failed"\} (\S+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


def assert_refused(daemon: Daemon, sentence: str, outbox: str) -> None:
    """The daemon is up, says ``sentence`` once per attempt, and /readyz says so."""
    lines = failures(daemon, 3)
    counted = failed_connects(daemon)
    after = failures(daemon, 3)
    # One line per attempt: the attempts counted lie between the lines seen before and after.
    assert len(lines) <= counted <= len(after), (len(lines), counted, len(after))
    for line in after:
        assert line["error"] == sentence, line
        assert line["url"] == f"amqps://guest:***@127.0.0.1:{AMQPS_PORT}/", line
        assert line["level"] == "warning", line
    # Nothing else to read: no other warning, no library's own line, no traceback.
    assert all(text.startswith("{") for text in daemon.log_file.read_text().splitlines())
    loud = [line for line in daemon.logs() if line["level"] in ("warning", "error", "critical")]
    assert {line["event"] for line in loud} == {"broker_connect_failed"}, loud
    status, body = get(daemon, "/readyz")
    state = json.loads(body)
    assert state["broker"] == "not connected"
    assert state["broker_error"] == sentence
    assert "node" not in state
    if outbox == "off":
        assert (status, state["status"], state["outbox"]) == (503, "not_ready", "off")
    else:
        assert (status, state["status"], state["outbox"]) == (200, "ready", "usable")
    assert daemon.process.poll() is None, "the daemon died"


def test_events_go_over_amqps_with_a_client_certificate(
    tls_broker: TlsBroker, tmp_path: Path
) -> None:
    certs = tls_broker.certs
    daemon, signer, queue = start_daemon(
        tmp_path, tls_broker.url(), ca=certs.ca, pair=certs.client, outbox="off"
    )
    try:
        daemon.wait_ready()
        status, body = get(daemon, "/readyz")
        assert status == 200
        assert json.loads(body) == {
            "status": "ready",
            "broker": "connected",
            "outbox": "off",
            "outbox_depth": 0,
            "node": NODE_NAME,
        }
        assert post(daemon, signer, "tls-1") == 200
        assert asyncio.run(read_back(tls_broker, queue, 1)) == ["tls-1"]
        _, metrics = get(daemon, "/metrics")
        assert f'bridge_broker_node_info{{node="{NODE_NAME}"}} 1.0' in metrics
        # TLS under aiormq leaves the fast publish path usable (bridge/channel.py).
        path = "portable" if os.environ.get("BRIDGE_PUBLISH_PATH") == "portable" else "fast"
        assert f'bridge_publish_path{{path="{path}"}} 1.0' in metrics
        connected = daemon.wait_log("broker_connected")
        assert connected["node"] == NODE_NAME
        code, logs = daemon.stop()
    finally:
        daemon.kill()
    assert code == 0
    loud = [line for line in logs if line["level"] in ("warning", "error", "critical")]
    # make test-portable: the one warning that the publish path is the portable one
    assert [line["event"] for line in loud] == ["publish_path_portable"] * (path == "portable")


CASES = {
    # the ca_file is another CA's: the broker's chain ends in a CA we do not trust
    "unknown CA": (UNTRUSTED, "other_ca", "client", "server", ""),
    "expired broker certificate": (EXPIRED, "ca", "client", "expired", ""),
    # a certificate for another name than the URL's host (127.0.0.1), and no server_name
    "wrong name": (WRONG_NAME, "ca", "client", "named", ""),
    "server_name not on the certificate": (
        WRONG_NAME,
        "ca",
        "client",
        "server",
        "not-the-broker.example",
    ),
    "no client certificate": (NO_CLIENT_CERT, "ca", "", "server", ""),
    "client certificate from a CA the broker does not trust": (
        CLIENT_CA_UNKNOWN,
        "ca",
        "stranger",
        "server",
        "",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_handshake_that_fails_keeps_the_daemon_up_and_says_why(
    tls_broker: TlsBroker, tmp_path: Path, case: str
) -> None:
    sentence, ca, ours, theirs, server_name = CASES[case]
    certs = tls_broker.certs
    ca_file: Path = getattr(certs, ca)
    pair: Pair | None = getattr(certs, ours) if ours else None
    with tls_broker.presenting(getattr(certs, theirs)):
        daemons = {
            outbox: start_daemon(
                tmp_path / outbox,
                tls_broker.url(),
                ca=ca_file,
                pair=pair,
                outbox=outbox,
                server_name=server_name,
            )[0]
            for outbox in ("off", "fallback")
        }
        try:
            for outbox, daemon in daemons.items():
                assert_refused(daemon, sentence, outbox)
            for daemon in daemons.values():
                code, logs = daemon.stop()
                assert code == 0
                assert not [line for line in logs if line["event"] == "broker_connected"]
        finally:
            for daemon in daemons.values():
                daemon.kill()


def test_server_name_is_the_name_checked(tls_broker: TlsBroker, tmp_path: Path) -> None:
    """A certificate that names the broker but not the URL's host: broker.tls.server_name."""
    certs = tls_broker.certs
    with tls_broker.presenting(certs.named):
        daemon, signer, queue = start_daemon(
            tmp_path, tls_broker.url(), ca=certs.ca, pair=certs.client, server_name=NAMED
        )
        try:
            daemon.wait_ready()
            assert post(daemon, signer, "named-1") == 200
            code, _ = daemon.stop()
        finally:
            daemon.kill()
    assert code == 0
    assert asyncio.run(read_back(tls_broker, queue, 1)) == ["named-1"]


def test_tls_1_2_alerts_are_named_too(tls_broker: TlsBroker) -> None:
    """A broker on TLS 1.2 says "handshake failure" where 1.3 says "certificate required", and
    fails a client certificate it does not trust during the handshake: both in words."""
    certs = tls_broker.certs

    async def attempt(pair: Pair | None) -> str | None:
        tls = BrokerTls(
            ca_file=str(certs.ca),
            cert_file=str(pair.cert) if pair else "",
            key_file=str(pair.key) if pair else "",
        )
        context = client_context(tls)
        context.maximum_version = ssl.TLSVersion.TLSv1_2
        node = Node.from_url(tls_broker.url(), 5)
        try:
            connection = await node.open(connect_timeout=5, name="tls-1.2", context=context)
        except Exception as exc:  # the point: what it says
            return tls_problem(exc)
        await connection.close()
        return None

    assert asyncio.run(attempt(certs.client)) is None  # 1.2 itself is fine
    assert asyncio.run(attempt(None)) == (
        "the broker refused the handshake: it requires a client certificate "
        "(broker.tls.cert_file, key_file), or shares no TLS version or cipher with us"
    )
    assert asyncio.run(attempt(certs.stranger)) == CLIENT_CA_UNKNOWN


def test_external_logs_in_with_the_certificate_alone(tls_broker: TlsBroker, tmp_path: Path) -> None:
    certs = tls_broker.certs
    url = f"amqps://127.0.0.1:{AMQPS_PORT}/?auth=external"
    daemon, signer, queue = start_daemon(tmp_path, url, ca=certs.ca, pair=certs.client)
    try:
        daemon.wait_ready()
        assert post(daemon, signer, "external-1") == 200
        assert asyncio.run(read_back(tls_broker, queue, 1, url)) == ["external-1"]
        # The broker took the certificate's CN as the user, with no password.
        listed = tls_broker.ctl("list_connections", "user", "auth_mechanism", "ssl", "name")
        ours = [row.split("\t") for row in listed.stdout.splitlines() if EXTERNAL_USER in row]
        assert [row[:3] for row in ours] == [[EXTERNAL_USER, "EXTERNAL", "true"]], listed.stdout
        code, _ = daemon.stop()
    finally:
        daemon.kill()
    assert code == 0


def test_no_password_shows_in_logs_readyz_or_metrics(tls_broker: TlsBroker, tmp_path: Path) -> None:
    """Two nodes: the first refuses the login (a wrong password, on the plain port), the second
    takes it over TLS; after a forced reconnect both are named again, never a password."""
    certs = tls_broker.certs
    urls = (
        f"amqp://{USER}:secret1@127.0.0.1:{AMQP_PORT}/,"
        f"amqps://{USER}:{PASSWORD}@127.0.0.1:{AMQPS_PORT}/"
    )
    daemon, _, _ = start_daemon(tmp_path, urls, ca=certs.ca, pair=certs.client)
    seen: list[str] = []
    try:
        daemon.wait_ready()
        refused = failures(daemon, 1)[0]
        assert refused["url"] == f"amqp://{USER}:***@127.0.0.1:{AMQP_PORT}/"
        assert "ACCESS_REFUSED" in refused["error"], refused
        assert daemon.wait_log("broker_connected")["url"] == (
            f"amqps://{USER}:***@127.0.0.1:{AMQPS_PORT}/"
        )
        seen += [get(daemon, "/readyz")[1], get(daemon, "/metrics")[1]]
        tls_broker.ctl("close_all_connections", "test: reconnect")
        daemon.wait_log("broker_connection_lost")
        deadline = time.monotonic() + 15
        while len([x for x in daemon.logs() if x["event"] == "broker_connected"]) < 2:
            assert time.monotonic() < deadline, "did not reconnect"
            time.sleep(0.1)
        seen += [get(daemon, "/readyz")[1], get(daemon, "/metrics")[1]]
        checked = cli("check-config", "--config", str(daemon.config), env=daemon.env)
        assert checked.returncode == 0, checked.stderr
        seen += [checked.stdout, checked.stderr]
        code, _ = daemon.stop()
    finally:
        daemon.kill()
    seen.append(daemon.log_file.read_text())
    assert code == 0
    assert f'bridge_broker_node_info{{node="127.0.0.1:{AMQP_PORT}"}} 0.0' in seen[1]
    for text in seen:
        assert "secret1" not in text, text
        assert PASSWORD not in text, text
