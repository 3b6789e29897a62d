"""HTTPS on the webhook port (SPEC §8), end to end: ``events-bridge serve`` with ``server.tls``
(the shipped config, turned on by BRIDGE_TLS_*), on the real broker.

HTTPS answers as HTTP does (events, refusals, the challenge, health and metrics, the container's
healthcheck); the connection limits hold for handshakes too (a TLS slowloris is cut at the
header timeout, a flood of half-open handshakes is shed and never starves a sender); mTLS
refuses a missing, foreign or expired client certificate in the handshake; plain HTTP to the
port gets no answer and no alarm; a certificate that does not load is exit 78 with one line.
Rotation on SIGHUP is in test_tls_server_rotation.py; the guard's handshakes in process, on
both event loops, in test_https.py.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import resource
import shutil
import socket
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika
import orjson
import pytest
from cryptography import x509

from bridge.config import BrokerConfig
from tests.certs import Authority, Pair
from tests.conftest import ROOT
from tests.helpers import CLIENT_ID, EVENTS, SigningKey
from tests.processes import Daemon, cli, daemon_env
from tests.test_cli import isolated_config

LIGHTROOM = orjson.loads((EVENTS / "imaging_lightroom-job-status_succeeded.json").read_bytes())
HEALTHCHECK = ROOT / "deploy" / "container" / "healthcheck"


@dataclass(frozen=True)
class Certs:
    ca: Authority
    server: Pair
    rotated: Pair  # the same CA's, for a rotation
    client: Pair
    expired: Pair  # a client certificate of the right CA, expired yesterday
    stranger: Pair  # a client certificate of a CA the daemon does not trust


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory)


def make_certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    folder = tmp_path_factory.mktemp("tls-server")
    ca = Authority.create(folder / "ca")
    other = Authority.create(folder / "other", "another CA")
    return Certs(
        ca,
        ca.issue("server"),
        ca.issue("rotated"),
        ca.issue("client", client=True),
        ca.issue("expired", client=True, expired=True),
        other.issue("stranger", client=True),
    )


@dataclass
class Https:
    """A daemon serving HTTPS with the pair copied to ``tls/`` (so a test can replace it)."""

    daemon: Daemon
    signer: SigningKey
    queue: str
    cert_file: Path
    key_file: Path
    ca: Authority
    client: Pair | None = None  # the certificate requests present, under mTLS

    @property
    def port(self) -> int:
        return int(self.daemon.env["BRIDGE_PORT"])

    def context(self, client: Pair | None = None) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=self.ca.cert_file)
        pair = client or self.client
        if pair is not None:
            context.load_cert_chain(pair.cert, pair.key)
        return context

    def connect(self, client: Pair | None = None) -> http.client.HTTPSConnection:
        return http.client.HTTPSConnection(
            "127.0.0.1", self.port, context=self.context(client), timeout=10
        )

    def get(self, path: str) -> tuple[int, bytes]:
        conn = self.connect()
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def post(
        self, conn: http.client.HTTPConnection, body: bytes, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, Any]]:
        conn.request("POST", "/webhook", body=body, headers=headers or self.signer.headers(body))
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"{}")

    def wait_ready(self, seconds: float = 30) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            assert self.daemon.process.poll() is None, self.daemon.log_file.read_text()
            try:
                status, body = self.get("/readyz")
                if status == 200 and json.loads(body)["broker"] == "connected":
                    return
            except (OSError, http.client.HTTPException):
                pass
            time.sleep(0.1)
        raise AssertionError(f"not ready over HTTPS:\n{self.daemon.log_file.read_text()}")

    def metric(self, reason: str) -> float:
        status, text = self.get("/metrics")
        assert status == 200
        line = f'bridge_connections_closed_total{{reason="{reason}"}} '
        found = [row for row in text.decode().splitlines() if row.startswith(line)]
        return float(found[0].split()[-1]) if found else 0.0


@pytest.fixture
def https(
    tmp_path: Path, amqp_url: str, forget_topology: list[BrokerConfig], certs: Certs
) -> Iterator[Any]:
    """Start an HTTPS daemon: ``https(edits=..., client_ca=..., args=..., max_files=...)``."""
    yield from https_daemons(tmp_path, amqp_url, forget_topology, certs)


def https_daemons(
    tmp_path: Path, amqp_url: str, forget_topology: list[BrokerConfig], certs: Certs
) -> Iterator[Any]:
    started: list[Https] = []

    def start(
        edits: dict[str, str] | None = None,
        client_ca: Path | None = None,
        args: tuple[str, ...] = (),
        max_files: int | None = None,
    ) -> Https:
        folder = tmp_path / f"d{len(started)}"
        tls = folder / "tls"
        tls.mkdir(parents=True)
        cert_file, key_file = tls / "server.pem", tls / "server.key"
        install(certs.server, cert_file, key_file)
        config = isolated_config(folder, forget_topology)
        text = config.read_text()
        for old, new in (edits or {}).items():
            assert old in text, old
            text = text.replace(old, new)
        config.write_text(text)
        signer = SigningKey.generate()
        env = daemon_env(folder, signer, amqp_url)
        env["BRIDGE_TLS_CERT_FILE"], env["BRIDGE_TLS_KEY_FILE"] = str(cert_file), str(key_file)
        env["BRIDGE_TLS_CLIENT_CA_FILE"] = str(client_ca or "")
        daemon = Daemon(config, env, args, max_files=max_files)
        daemon.url = f"https://127.0.0.1:{env['BRIDGE_PORT']}"
        queue = forget_topology[-1].unrouted_queue  # the default route's events end there
        made = Https(daemon, signer, queue, cert_file, key_file, certs.ca)
        started.append(made)
        return made

    yield start
    for made in started:
        made.daemon.kill()


def install(pair: Pair, cert_file: Path, key_file: Path) -> None:
    shutil.copyfile(pair.cert, cert_file)
    shutil.copyfile(pair.key, key_file)


def event(event_id: str) -> bytes:
    return orjson.dumps({**LIGHTROOM, "event_id": event_id, "recipientclientid": CLIENT_ID})


def serial(pair: Pair) -> int:
    return x509.load_pem_x509_certificate(pair.cert.read_bytes()).serial_number


def peer_serial(sock: ssl.SSLSocket) -> int:
    der = sock.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def queued(amqp_url: str, queue: str, expected: set[str], seconds: float = 15) -> set[str]:
    """The message ids of ``queue`` (consumed) once all of ``expected`` have come."""

    async def read() -> set[str]:
        found: set[str] = set()
        connection = await aio_pika.connect(amqp_url)
        async with connection:
            source = await (await connection.channel()).get_queue(queue, ensure=False)
            deadline = time.monotonic() + seconds
            while not expected <= found and time.monotonic() < deadline:
                message = await source.get(fail=False, no_ack=True)
                if message is None:
                    await asyncio.sleep(0.05)
                else:
                    found.add(message.message_id or "")
        return found

    return asyncio.run(read())


def no_http_answer(port: int, data: bytes, client: ssl.SSLContext | None = None) -> bool:
    """True when ``data`` sent to the port gets no byte of HTTP back: closed, or reset, or
    (``client``: over TLS) the handshake refused."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        try:
            if client is None:
                raw.sendall(data)
                return not raw.recv(65536).startswith(b"HTTP")
            with client.wrap_socket(raw, server_hostname="localhost") as secure:
                secure.sendall(data)  # TLS 1.3: the refusal comes after the client's Finished
                return not secure.recv(65536).startswith(b"HTTP")
        except (ssl.SSLError, ConnectionError):
            return True


def quiet(daemon: Daemon) -> list[dict[str, Any]]:
    """The daemon's log lines at warning level or above (but the one that says a run on the
    portable publish path, BRIDGE_PUBLISH_PATH=portable, is on it)."""
    return [
        line
        for line in daemon.logs()
        if line["level"] not in {"debug", "info"} and line["event"] != "publish_path_portable"
    ]


def test_https_answers_as_http_does(https: Any, amqp_url: str) -> None:
    served: Https = https(edits={"max_body_bytes: 10485760": "max_body_bytes: 65536"})
    served.wait_ready()
    listening = served.daemon.wait_log("bridge_listening")
    assert (listening["scheme"], listening["client_certificates"]) == ("https", None)
    conn = served.connect()  # one keep-alive connection for the answers that keep it
    ids = [f"tls-{uuid.uuid4().hex[:8]}-{n}" for n in range(3)]
    for event_id in ids:
        status, answer = served.post(conn, event(event_id))
        assert status == 200, answer
    kept = conn.sock
    assert kept is not None
    body = event("forged")
    forged = {**served.signer.headers(body), "x-adobe-digital-signature-1": "AAAA"}
    forged["x-adobe-digital-signature-2"] = "AAAA"
    status, answer = served.post(conn, body, forged)
    assert status == 401, answer
    assert conn.sock is kept  # all of it on one connection
    conn.close()
    assert set(ids) <= queued(amqp_url, served.queue, set(ids))
    status, answer = served.post(served.connect(), event("x" * 100_000))
    assert status == 413, answer
    assert served.get("/webhook?challenge=tls-check") == (200, b'{"challenge":"tls-check"}')
    for path in ("/healthz", "/readyz", "/metrics"):
        assert served.get(path)[0] == 200, path
    # Plain HTTP to the HTTPS port: nothing back that reads as an answer.
    assert no_http_answer(served.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert served.metric("handshake_failed") >= 1
    assert quiet(served.daemon) == []
    said = [line for line in served.daemon.logs() if line["event"] == "tls_handshake_failed"]
    assert len(said) == 1, said
    assert said[0]["detail"] == "HTTP_REQUEST", said


def test_the_container_healthcheck_follows_https(https: Any) -> None:
    served: Https = https()
    served.wait_ready()
    env = {"BRIDGE_PORT": str(served.port), "BRIDGE_TLS_CERT_FILE": str(served.cert_file)}
    for path in ((), ("/readyz",)):
        done = run_healthcheck(env, *path)
        assert done.returncode == 0, done.stderr
    plain = run_healthcheck({"BRIDGE_PORT": str(served.port), "BRIDGE_TLS_CERT_FILE": ""})
    assert plain.returncode == 1  # plain HTTP to the HTTPS port is not healthy
    assert len(plain.stderr.splitlines()) == 1, plain.stderr


def run_healthcheck(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(HEALTHCHECK), *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )


async def closed_within(reader: asyncio.StreamReader, seconds: float) -> float | None:
    """Seconds until the daemon closed the connection, or None if it did not in ``seconds``."""
    started = time.monotonic()
    try:
        while await asyncio.wait_for(reader.read(65536), started + seconds - time.monotonic()):
            pass
    except ConnectionError:
        pass
    except TimeoutError:
        return None
    return time.monotonic() - started


async def test_the_connection_limits_hold_for_handshakes_too(https: Any) -> None:
    """header_timeout 1, idle_timeout 2: a secure connection that says nothing goes at 2 s,
    one trickling its headers at 1 s, and a TCP connection that never ends its handshake (a
    TLS slowloris: silent, or a ClientHello cut short) at 1 s too."""
    served: Https = https(
        edits={"header_timeout: 5 ": "header_timeout: 1 ", "idle_timeout: 15 ": "idle_timeout: 2 "}
    )
    await asyncio.to_thread(served.wait_ready)
    context = served.context()
    idle = await asyncio.open_connection(
        "127.0.0.1", served.port, ssl=context, server_hostname="localhost"
    )
    trickle = await asyncio.open_connection(
        "127.0.0.1", served.port, ssl=context, server_hostname="localhost"
    )
    silent = await asyncio.open_connection("127.0.0.1", served.port)
    cut_short = await asyncio.open_connection("127.0.0.1", served.port)
    cut_short[1].write(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")  # a ClientHello's start

    async def trickling() -> None:
        for byte in b"POST /webhook HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100:
            if trickle[0].at_eof():
                return
            trickle[1].write(bytes([byte]))
            await asyncio.sleep(0.2)

    slow = asyncio.create_task(trickling())
    took = await asyncio.gather(
        *(closed_within(reader, 6) for reader, _ in (idle, trickle, silent, cut_short))
    )
    slow.cancel()
    for _, writer in (idle, trickle, silent, cut_short):
        writer.close()
    seconds = [t if t is not None else 99.0 for t in took]  # None: still open after 6 s
    assert 1.5 < seconds[0] < 3.5, took  # idle_timeout
    assert all(0.5 < t < 2.5 for t in seconds[1:]), took  # header_timeout
    reasons = ("idle_timeout", "headers_timeout", "handshake_timeout")
    counted = [await asyncio.to_thread(served.metric, reason) for reason in reasons]
    assert counted == [1, 1, 2]
    assert quiet(served.daemon) == []


async def test_a_flood_of_half_open_handshakes_cannot_starve_a_sender(https: Any) -> None:
    """A process allowed 256 descriptors (192 connections), 400 connections that never start
    their handshake: each newcomer sheds the oldest of them, so signed events still get their
    200 at once (not at the 5 s header timeout, when the flood would go by itself)."""
    served: Https = https(max_files=256)
    await asyncio.to_thread(served.wait_ready)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))
    flood = [await asyncio.open_connection("127.0.0.1", served.port) for _ in range(400)]
    try:
        conn = served.connect()
        for n in range(5):
            started = time.monotonic()
            status, answer = await asyncio.to_thread(served.post, conn, event(f"flood-{n}"))
            assert status == 200, answer
            assert time.monotonic() - started < 2.0
            conn.close()  # a new connection each time: each must get through the flood
        assert await asyncio.to_thread(served.metric, "shed_handshake") >= 400 - 192
        # SIGTERM with 190-odd handshakes under way: they end at once, and so does the daemon.
        started = time.monotonic()
        code, logs = await asyncio.to_thread(served.daemon.stop)
        assert code == 0
        assert time.monotonic() - started < 5.0
    finally:
        for _, writer in flood:
            writer.close()
    assert any(line["event"] == "connection_bound_lowered" for line in logs)
    alarms = [line for line in quiet(served.daemon) if line["event"] != "connection_bound_lowered"]
    assert alarms == []


def test_mtls_refuses_a_missing_foreign_or_expired_client_certificate(
    https: Any, certs: Certs, amqp_url: str
) -> None:
    served: Https = https(client_ca=certs.ca.cert_file)
    served.client = certs.client
    served.wait_ready()
    listening = served.daemon.wait_log("bridge_listening")
    assert (listening["scheme"], listening["client_certificates"]) == ("https", "required")
    request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    for wrong in (None, certs.stranger, certs.expired):
        context = ssl.create_default_context(cafile=certs.ca.cert_file)
        if wrong is not None:
            context.load_cert_chain(wrong.cert, wrong.key)
        assert no_http_answer(served.port, request, context), wrong
    conn = served.connect(certs.client)
    status, answer = served.post(conn, event("mtls-ok"))
    conn.close()
    assert status == 200, answer
    assert "mtls-ok" in queued(amqp_url, served.queue, {"mtls-ok"})
    assert served.metric("handshake_failed") == 3
    said = [line for line in served.daemon.logs() if line["event"] == "tls_handshake_failed"]
    assert len(said) == 1, said  # at most once a minute
    assert said[0]["detail"] == "PEER_DID_NOT_RETURN_A_CERTIFICATE", said
    assert quiet(served.daemon) == []
    # The container's healthcheck presents a client certificate when given one.
    env = {"BRIDGE_PORT": str(served.port), "BRIDGE_TLS_CERT_FILE": str(served.cert_file)}
    env |= {"BRIDGE_HEALTHCHECK_CERT_FILE": "", "BRIDGE_HEALTHCHECK_KEY_FILE": ""}
    assert run_healthcheck(env).returncode == 1
    env["BRIDGE_HEALTHCHECK_CERT_FILE"] = str(certs.client.cert)
    env["BRIDGE_HEALTHCHECK_KEY_FILE"] = str(certs.client.key)
    done = run_healthcheck(env, "/readyz")
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize(
    "case",
    [
        "cert_without_key",
        "ca_without_cert",
        "missing_cert",
        "cert_not_pem",
        "key_not_pem",
        "ca_not_pem",
    ],
)
def test_tls_files_that_cannot_be_used_are_exit_78_with_one_line(
    case: str, certs: Certs, tmp_path: Path
) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("this is not PEM\n")
    cert, key, ca = str(certs.server.cert), str(certs.server.key), str(certs.ca.cert_file)
    env, key_named, file_named = {
        "cert_without_key": ({"BRIDGE_TLS_CERT_FILE": cert}, "server.tls.key_file", None),
        "ca_without_cert": ({"BRIDGE_TLS_CLIENT_CA_FILE": ca}, "server.tls.client_ca_file", None),
        "missing_cert": (
            {"BRIDGE_TLS_CERT_FILE": str(tmp_path / "gone.pem"), "BRIDGE_TLS_KEY_FILE": key},
            "server.tls.cert_file",
            str(tmp_path / "gone.pem"),
        ),
        "cert_not_pem": (
            {"BRIDGE_TLS_CERT_FILE": str(junk), "BRIDGE_TLS_KEY_FILE": key},
            "server.tls.cert_file",
            str(junk),
        ),
        "key_not_pem": (
            {"BRIDGE_TLS_CERT_FILE": cert, "BRIDGE_TLS_KEY_FILE": str(junk)},
            "server.tls.key_file",
            str(junk),
        ),
        "ca_not_pem": (
            {
                "BRIDGE_TLS_CERT_FILE": cert,
                "BRIDGE_TLS_KEY_FILE": key,
                "BRIDGE_TLS_CLIENT_CA_FILE": str(junk),
            },
            "server.tls.client_ca_file",
            str(junk),
        ),
    }[case]
    base = {"BRIDGE_CLIENT_IDS": CLIENT_ID, "BRIDGE_OUTBOX_DIR": str(tmp_path / "outbox")}
    base |= {"BRIDGE_TLS_CERT_FILE": "", "BRIDGE_TLS_KEY_FILE": "", "BRIDGE_TLS_CLIENT_CA_FILE": ""}
    for command in ("check-config", "serve"):
        done = cli(command, "--config", "config/bridge.yaml", env={**base, **env}, timeout=30)
        assert done.returncode == 78, (command, done.stderr)
        lines = done.stderr.splitlines()
        assert len(lines) == 1, (command, done.stderr)
        assert "Traceback" not in done.stderr
        assert key_named in lines[0], (command, lines)
        assert file_named is None or file_named in lines[0], (command, lines)
    assert not (tmp_path / "outbox").exists()  # serve stopped before it opened anything


def test_help_and_check_config_say_https(certs: Certs) -> None:
    help_text = cli("serve", "--help").stdout
    assert "HTTPS" in help_text
    assert "mTLS" in help_text
    assert "SIGHUP reloads the HTTPS certificate" in help_text
    env = {"BRIDGE_CLIENT_IDS": CLIENT_ID}
    assert "listening http://" in cli("check-config", env=env).stdout
    env |= {
        "BRIDGE_TLS_CERT_FILE": str(certs.server.cert),
        "BRIDGE_TLS_KEY_FILE": str(certs.server.key),
    }
    assert "listening https://" in cli("check-config", env=env).stdout
    env["BRIDGE_TLS_CLIENT_CA_FILE"] = str(certs.ca.cert_file)
    done = cli("check-config", env=env)
    assert done.returncode == 0, done.stderr
    assert "listening https://127.0.0.1:8080 (client certificates required)" in done.stdout


def test_under_mtls_only_the_client_ca_is_trusted(certs: Certs) -> None:
    """Not the system's CAs too: a client certificate any public CA signed must not pass."""
    from bridge.config_types import ServerTls
    from bridge.tls import server_context

    tls = ServerTls(str(certs.server.cert), str(certs.server.key), str(certs.ca.cert_file))
    context = server_context(tls)
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.cert_store_stats()["x509_ca"] == 1
    assert context.minimum_version >= ssl.TLSVersion.TLSv1_2


def test_a_reload_cannot_turn_https_on_or_off(certs: Certs) -> None:
    from bridge.config_types import ServerTls
    from bridge.errors import ConfigError
    from bridge.tls import reload_server_context, server_context

    on = ServerTls(str(certs.server.cert), str(certs.server.key))
    running = server_context(on)
    with pytest.raises(ConfigError, match="cannot be turned on by a reload"):
        reload_server_context(on, None)
    with pytest.raises(ConfigError, match="cannot be turned off by a reload"):
        reload_server_context(ServerTls(), running)
    assert reload_server_context(ServerTls(), None) is None
    renewed = reload_server_context(on, running)
    assert renewed is not None
    assert renewed is not running  # a new context: the running one is never changed in place
