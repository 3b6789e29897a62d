"""A private RabbitMQ node with an ``amqps`` listener that demands a client certificate, for the
TLS tests (``tests/test_tls_broker.py``) and the bench (SPEC §8). Certificates are made at start
(``tests/certs.py``); no key is ever committed.

The node listens on loopback only: AMQPS on 127.0.0.1:5691, plain AMQP on 127.0.0.1:5692. Its TLS
options verify the peer and refuse a client without a certificate; ``rabbitmq_auth_mechanism_ssl``
offers EXTERNAL beside PLAIN, the user being the certificate's CN (:data:`EXTERNAL_USER`). Users
come from a definitions file loaded at boot (no CLI call): ``guest``, :data:`USER` with
:data:`PASSWORD`, and :data:`EXTERNAL_USER` without a password.

RabbitMQ 3.10 (the default): the host's ``/usr/lib/rabbitmq/bin/rabbitmq-server``, started as a
child with its own epmd (port 14370, started by us, stopped by its PID), distribution port 25692
and data in the given folder. ``BRIDGE_TEST_RABBITMQ=4``: a podman container of
``localhost/rabbitmq:4`` with the config and certificates mounted read-only. :meth:`TlsBroker.stop`
leaves nothing behind either way.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from tests.broker_node import podman_environment, unforward, version_under_test
from tests.certs import Authority, Pair

AMQPS_PORT: Final = 5691
AMQP_PORT: Final = 5692
DIST_PORT: Final = 25692
EPMD_PORT: Final = 14370
NODE: Final = "bridge-tls@localhost"
IMAGE: Final = "localhost/rabbitmq:4"
EXTERNAL_USER: Final = "bridge-client"  # the client certificate's CN: EXTERNAL logs in as it
USER: Final = "u"
PASSWORD: Final = "secret2"
NAMED: Final = "broker.internal"  # the only name on Certificates.named
SERVER_BIN: Final = Path("/usr/lib/rabbitmq/bin")
START_SECONDS: Final = 90.0


@dataclass(frozen=True)
class Certificates:
    """The test's PKI: a trusted CA and one nobody trusts, and what each signed."""

    ca: Path  # signs the broker's and our client certificate; the broker trusts it
    other_ca: Path  # trusted by nobody
    server: Pair  # the broker's: localhost, 127.0.0.1, ::1
    expired: Pair  # the broker's, expired yesterday
    named: Pair  # the broker's, for NAMED only: no address, not localhost
    client: Pair  # ours, CN = EXTERNAL_USER
    stranger: Pair  # a client certificate from other_ca

    @classmethod
    def make(cls, folder: Path) -> Certificates:
        ca = Authority.create(folder / "ca")
        other = Authority.create(folder / "other", "untrusted test CA")
        return cls(
            ca=ca.cert_file,
            other_ca=other.cert_file,
            server=ca.issue("broker"),
            expired=ca.issue("broker-expired", expired=True),
            named=ca.issue("broker-named", hosts=(NAMED,)),
            client=ca.issue(EXTERNAL_USER, client=True),
            stranger=other.issue("stranger", client=True),
        )


def _password_hash(password: str) -> str:
    """RabbitMQ's rabbit_password_hashing_sha256: base64(salt + sha256(salt + password))."""
    salt = os.urandom(4)
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


def _definitions() -> str:
    users = [("guest", "guest", "administrator"), (USER, PASSWORD, ""), (EXTERNAL_USER, "", "")]
    return json.dumps(
        {
            "users": [
                {
                    "name": name,
                    "password_hash": _password_hash(password) if password else "",
                    "hashing_algorithm": "rabbit_password_hashing_sha256",
                    "tags": tags,
                }
                for name, password, tags in users
            ],
            "vhosts": [{"name": "/"}],
            "permissions": [
                {"user": name, "vhost": "/", "configure": ".*", "write": ".*", "read": ".*"}
                for name, _, _ in users
            ],
        }
    )


def _config(etc: str, amqps: str, amqp: str) -> str:
    """rabbitmq.conf; ``etc`` is the config folder as the node sees it."""
    return f"""\
listeners.tcp.default = {amqp}
listeners.ssl.default = {amqps}
loopback_users.guest = false
ssl_options.cacertfile = {etc}/ca.pem
ssl_options.certfile = {etc}/server.pem
ssl_options.keyfile = {etc}/server.key
ssl_options.verify = verify_peer
ssl_options.fail_if_no_peer_cert = true
auth_mechanisms.1 = PLAIN
auth_mechanisms.2 = EXTERNAL
ssl_cert_login_from = common_name
load_definitions = {etc}/definitions.json
log.console = false
log.file.level = info
"""


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class TlsBroker:
    """The node; see the module docstring. ``version`` is ``3`` (a host node) or ``4`` (podman)."""

    folder: Path
    certs: Certificates
    version: str = field(default_factory=version_under_test)
    container: str = field(default_factory=lambda: f"events-bridge-tls-{os.getpid()}")
    _epmd: subprocess.Popen[bytes] | None = None
    _server: subprocess.Popen[bytes] | None = None
    _podman_env: dict[str, str] = field(default_factory=dict)

    @property
    def etc(self) -> Path:
        return self.folder / "etc"

    def url(self, user: str = "guest", password: str = "guest", query: str = "") -> str:
        """The ``amqps://`` URL (``query`` without its ``?``)."""
        login = f"{user}:{password}@" if user else ""
        return f"amqps://{login}127.0.0.1:{AMQPS_PORT}/" + (f"?{query}" if query else "")

    @property
    def plain_url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{AMQP_PORT}/"

    def start(self) -> None:
        busy = [p for p in (AMQPS_PORT, AMQP_PORT, DIST_PORT, EPMD_PORT) if port_open(p)]
        if busy:
            raise RuntimeError(f"the TLS broker's ports are taken on 127.0.0.1: {busy}")
        self.etc.mkdir(parents=True)
        if self.version == "4":  # the container's own ports, mapped to ours on 127.0.0.1
            config = _config("/etc/rabbitmq", "5671", "5672")
        else:
            config = _config(str(self.etc), f"127.0.0.1:{AMQPS_PORT}", f"127.0.0.1:{AMQP_PORT}")
        files = {
            "rabbitmq.conf": config,
            "enabled_plugins": "[rabbitmq_auth_mechanism_ssl].\n",
            "definitions.json": _definitions(),
            "ca.pem": self.certs.ca.read_text(),
        }
        for name, text in files.items():
            (self.etc / name).write_text(text)
        self._install(self.certs.server)
        # The container's rabbitmq user reads them; these are throwaway test keys.
        self.etc.chmod(0o755)
        for path in self.etc.iterdir():
            path.chmod(0o644)
        try:
            self._start_podman() if self.version == "4" else self._start_node()
            self._wait_started()
        except BaseException:
            self.stop()
            raise

    def _install(self, pair: Pair) -> None:
        """Write ``pair`` over the files the node's TLS options name (in place: the container
        sees the host's files through its mount)."""
        for source, name in ((pair.cert, "server.pem"), (pair.key, "server.key")):
            target = self.etc / name
            target.write_bytes(source.read_bytes())
            target.chmod(0o644)

    def _node_env(self) -> dict[str, str]:
        base = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        return {
            **base,
            "HOME": str(self.folder / "home"),  # its own Erlang cookie
            "ERL_EPMD_PORT": str(EPMD_PORT),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODENAME": NODE,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(AMQP_PORT),
            "RABBITMQ_DIST_PORT": str(DIST_PORT),
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
            "RABBITMQ_MNESIA_BASE": str(self.folder / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.folder / "log"),
            "RABBITMQ_PID_FILE": str(self.folder / "rabbit.pid"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.etc / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(self.etc / "rabbitmq"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.etc / "advanced.config"),
        }

    def _start_node(self) -> None:
        if not (SERVER_BIN / "rabbitmq-server").exists():
            raise RuntimeError(f"no {SERVER_BIN}/rabbitmq-server (apt-get install rabbitmq-server)")
        home = self.folder / "home"
        home.mkdir()
        cookie = home / ".erlang.cookie"
        cookie.write_text(base64.b32encode(os.urandom(15)).decode())
        cookie.chmod(0o400)
        env = self._node_env()
        self._epmd = subprocess.Popen(
            ["epmd", "-port", str(EPMD_PORT), "-address", "127.0.0.1"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + 10
        while not port_open(EPMD_PORT):
            if time.monotonic() > deadline or self._epmd.poll() is not None:
                raise RuntimeError(f"epmd did not listen on 127.0.0.1:{EPMD_PORT}")
            time.sleep(0.05)
        (self.folder / "log").mkdir()
        with (self.folder / "log" / "stdout.log").open("wb") as out:
            self._server = subprocess.Popen(
                [str(SERVER_BIN / "rabbitmq-server")],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own group: the script and its VM, killed together
            )

    def _start_podman(self) -> None:
        self._podman_env = podman_environment()
        self._podman("rm", "-f", self.container, check=False)
        unforward(AMQPS_PORT, AMQP_PORT)
        self._podman(
            "run", "-d", "--init", "--name", self.container, "--hostname", "bridge-tls",
            "-p", f"127.0.0.1:{AMQPS_PORT}:5671", "-p", f"127.0.0.1:{AMQP_PORT}:5672",
            "-v", f"{self.etc}:/etc/rabbitmq:ro", IMAGE,
        )  # fmt: skip

    def _podman(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["podman", *args],
            capture_output=True,
            text=True,
            env={**os.environ, **self._podman_env},
            timeout=120,
            check=check,
        )

    def ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``rabbitmqctl ARGS`` on the node (a second or so: the CLI boots a VM of its own)."""
        if self.version == "4":
            return self._podman("exec", self.container, "rabbitmqctl", "-q", *args, check=check)
        return subprocess.run(
            [str(SERVER_BIN / "rabbitmqctl"), "-q", "-n", NODE, *args],
            capture_output=True,
            text=True,
            env=self._node_env(),
            timeout=60,
            check=check,
        )

    def _wait_started(self) -> None:
        deadline = time.monotonic() + START_SECONDS
        while True:
            if self._server is not None and self._server.poll() is not None:
                raise RuntimeError(f"the TLS broker exited at start:\n{self.log_tail()}")
            if port_open(AMQP_PORT) and port_open(AMQPS_PORT):
                started = self.ctl("await_startup", "--timeout", "30", check=False)
                if started.returncode == 0:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the TLS broker did not start in time:\n{self.log_tail()}")
            time.sleep(0.2)

    def beam_pid(self) -> int | None:
        """The node's Erlang VM as the host sees it (to count its CPU), or None."""
        if self.version == "3":
            pid_file = self.folder / "rabbit.pid"
            return int(pid_file.read_text().strip()) if pid_file.exists() else None
        found = self._podman("container", "inspect", "--format", "{{.State.Pid}}", self.container)
        todo = [int(found.stdout.strip() or 0)]
        while todo:  # the container's init, its shell, then the VM
            pid = todo.pop()
            with contextlib.suppress(OSError):
                if Path(f"/proc/{pid}/comm").read_text().strip() == "beam.smp":
                    return pid
                children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
                todo.extend(int(child) for child in children)
        return None

    def log_tail(self) -> str:
        if self.version == "4":
            return self._podman("logs", "--tail", "40", self.container, check=False).stderr
        texts = [p.read_text(errors="replace") for p in sorted((self.folder / "log").glob("*"))]
        return "\n".join(text[-3000:] for text in texts)

    def presented(self) -> bytes:
        """The certificate (DER) the AMQPS listener shows a new connection now."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        context.load_cert_chain(self.certs.client.cert, self.certs.client.key)
        with (
            socket.create_connection(("127.0.0.1", AMQPS_PORT), timeout=5) as raw,
            context.wrap_socket(raw) as tls,
        ):
            der = tls.getpeercert(binary_form=True)
        assert der is not None
        return der

    @contextlib.contextmanager
    def presenting(self, pair: Pair) -> Iterator[None]:
        """The listener shows ``pair`` to new connections meanwhile, then the good one again."""
        self._show(pair)
        try:
            yield
        finally:
            self._show(self.certs.server)

    def _show(self, pair: Pair) -> None:
        self._install(pair)
        wanted = ssl.PEM_cert_to_DER_cert(pair.cert.read_text())
        deadline = time.monotonic() + 20
        while True:
            # Erlang's ssl keeps the PEM files it read; new handshakes read them again after this.
            self.ctl("eval", "ssl:clear_pem_cache().")
            if self.presented() == wanted:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"the broker still shows its old certificate, not {pair.cert}")
            time.sleep(0.5)

    def stop(self) -> None:
        """Stop the node (or remove the container), then its epmd; by PID, nothing left behind."""
        if self.version == "4":
            if self._podman_env:
                self._podman("rm", "-f", "-t", "5", self.container, check=False)
            return
        if self._server is not None:
            if self._server.poll() is None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.ctl("stop", check=False)
                try:
                    self._server.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(self._server.pid, signal.SIGKILL)
                    self._server.wait(timeout=10)
            self._server = None
        if self._epmd is not None:
            self._epmd.terminate()
            try:
                self._epmd.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._epmd.kill()
                self._epmd.wait(timeout=10)
            self._epmd = None


def unavailable(version: str | None = None) -> str | None:
    """Why no TLS node can be started here (a test skips, saying so), or None."""
    if (version or version_under_test()) == "3":
        if not (SERVER_BIN / "rabbitmq-server").exists() or shutil.which("epmd") is None:
            return f"needs RabbitMQ 3.x on this host ({SERVER_BIN}/rabbitmq-server, epmd)"
        return None
    if shutil.which("podman") is None:
        return "needs podman for the RabbitMQ 4 TLS node (BRIDGE_TEST_RABBITMQ=4)"
    found = subprocess.run(
        ["podman", "image", "exists", IMAGE],
        env={**os.environ, **podman_environment()},
        capture_output=True,
        timeout=60,
        check=False,
    )
    if found.returncode != 0:
        return f"needs the image {IMAGE} (deploy/container/image.sh rabbitmq)"
    return None


@contextlib.contextmanager
def running_tls_broker(folder: Path, certs: Certificates | None = None) -> Iterator[TlsBroker]:
    """A node started in ``folder`` (made empty) with ``certs`` (made there unless given),
    stopped after."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    broker = TlsBroker(folder, certs or Certificates.make(folder / "pki"))
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()
