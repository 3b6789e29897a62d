"""The HTTPS certificate rotated by SIGHUP (SPEC §8), end to end: new connections get the new
pair, connections already open keep theirs and go on serving; files that do not load are
refused with ``tls_reload_failed`` and the running certificate stays; with ``serve --workers``,
a SIGHUP to the parent rotates it in every worker."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bridge.config import BrokerConfig
from tests.processes import Daemon
from tests.test_tls_server import (
    Certs,
    Https,
    https_daemons,
    install,
    make_certs,
    peer_serial,
    serial,
)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory)


@pytest.fixture
def https(
    tmp_path: Path, amqp_url: str, forget_topology: list[BrokerConfig], certs: Certs
) -> Iterator[Any]:
    yield from https_daemons(tmp_path, amqp_url, forget_topology, certs)


def events(daemon: Daemon, event: str) -> list[dict[str, Any]]:
    return [line for line in daemon.logs() if line["event"] == event]


def wait_events(
    daemon: Daemon, event: str, count: int, seconds: float = 10
) -> list[dict[str, Any]]:
    """The ``event`` lines, once there are ``count`` of them."""
    deadline = time.monotonic() + seconds
    while len(found := events(daemon, event)) < count:
        assert daemon.process.poll() is None, daemon.log_file.read_text()
        assert time.monotonic() < deadline, f"{len(found)} {event}, not {count}"
        time.sleep(0.05)
    return found


def new_connection_serial(served: Https) -> int:
    """The serial of the certificate a new connection is served with (and it answers)."""
    conn = served.connect()
    try:
        conn.request("GET", "/healthz")
        response = conn.getresponse()
        assert (response.status, response.read()) == (200, b'{"status":"ok"}')
        assert conn.sock is not None
        return peer_serial(conn.sock)
    finally:
        conn.close()


def hang_up(served: Https, reloads: int, outcome: str) -> dict[str, Any]:
    """SIGHUP; then the ``outcome`` line (tls_reloaded, tls_reload_failed) numbered ``reloads``."""
    served.daemon.process.send_signal(signal.SIGHUP)
    return wait_events(served.daemon, outcome, reloads)[-1]


def test_sighup_rotates_the_certificate_and_open_connections_keep_theirs(
    https: Any, certs: Certs
) -> None:
    served: Https = https()
    served.wait_ready()
    old, new = serial(certs.server), serial(certs.rotated)
    assert new_connection_serial(served) == old
    kept = served.connect()
    kept.request("GET", "/healthz")
    assert kept.getresponse().read() == b'{"status":"ok"}'
    sock = kept.sock
    assert sock is not None

    install(certs.rotated, served.cert_file, served.key_file)
    hang_up(served, 1, "tls_reloaded")
    assert new_connection_serial(served) == new
    for _ in range(3):  # the connection opened before goes on, on the same TLS session
        kept.request("GET", "/readyz")
        response = kept.getresponse()
        assert (response.status, response.read()[:1]) == (200, b"{")
        assert kept.sock is sock
    assert peer_serial(sock) == old
    kept.close()

    # Files that do not load: refused, and the rotated pair goes on serving. A certificate
    # with a broken key, or with another's key, must not replace the running one half-way.
    install(certs.server, served.cert_file, served.key_file)
    served.key_file.write_text("not a key\n")
    failed = hang_up(served, 1, "tls_reload_failed")
    assert str(served.key_file) in failed["problems"][0], failed
    assert new_connection_serial(served) == new
    install(certs.server, served.cert_file, served.key_file)
    served.key_file.write_bytes(certs.rotated.key.read_bytes())
    failed = hang_up(served, 2, "tls_reload_failed")
    assert str(served.key_file) in failed["problems"][0], failed
    assert new_connection_serial(served) == new
    install(certs.rotated, served.cert_file, served.key_file)
    served.cert_file.write_text("not a certificate\n")
    failed = hang_up(served, 3, "tls_reload_failed")
    assert str(served.cert_file) in failed["problems"][0], failed
    assert new_connection_serial(served) == new
    served.cert_file.unlink()
    failed = hang_up(served, 4, "tls_reload_failed")
    assert str(served.cert_file) in failed["problems"][0], failed
    assert "no such file" in failed["problems"][0], failed
    assert new_connection_serial(served) == new

    install(certs.server, served.cert_file, served.key_file)  # and back: reloads still work
    hang_up(served, 2, "tls_reloaded")
    assert new_connection_serial(served) == old
    assert len(events(served.daemon, "tls_reloaded")) == 2  # failed ones are not said reloaded
    code, _ = served.daemon.stop()
    assert code == 0


def test_sighup_to_the_parent_rotates_the_certificate_in_every_worker(
    https: Any, certs: Certs
) -> None:
    """Each new connection goes to either worker (SO_REUSEPORT): twelve of them all on one
    worker would happen once in 2,000 runs, so a worker left with the old certificate shows."""
    served: Https = https(args=("--workers", "2"))
    wait_events(served.daemon, "bridge_listening", 2, seconds=30)
    served.wait_ready()
    old, new = serial(certs.server), serial(certs.rotated)
    assert {new_connection_serial(served) for _ in range(12)} == {old}

    install(certs.rotated, served.cert_file, served.key_file)
    os.kill(served.daemon.process.pid, signal.SIGHUP)  # the parent, which passes it on
    reloaded = wait_events(served.daemon, "tls_reloaded", 2)
    assert sorted(line["worker"] for line in reloaded) == [0, 1]
    assert [new_connection_serial(served) for _ in range(12)] == [new] * 12
    code, _ = served.daemon.stop()
    assert code == 0
