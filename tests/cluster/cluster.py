"""A 3-node RabbitMQ cluster in podman containers, for the cluster fault suite.

Three containers of ``localhost/rabbitmq:4`` (Debian 13's 4.0) or ``localhost/rabbitmq:3.10``
(Debian 12's 3.10), both built by ``deploy/container/image.sh rabbitmq [--version 3]``, on a
podman network of their own (a /24 no other network uses, static addresses so a node cut off and
connected again keeps its address), joined with ``rabbitmqctl join_cluster``. Each node's AMQP
port is published on 127.0.0.1 only: ``1878N`` for 4.x, ``1877N`` for 3.10 (clear of 5672 and
5682). ``cluster_partition_handling = pause_minority``, as RabbitMQ advises for three nodes.

The faults: :meth:`Cluster.kill` (``podman kill``: SIGKILL), :meth:`Cluster.stop` (graceful),
:meth:`Cluster.disconnect` / :meth:`Cluster.connect` (``podman network disconnect``/``connect``)
and :meth:`Cluster.start`. :meth:`Cluster.heal` brings every node back and checks the cluster:
all three running and clustered, no partition, every port answering AMQP.

Every wait is bounded; everything made here is named ``<prefix>-…`` and removed by
:meth:`Cluster.close`.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.broker_node import unforward
from tests.image.conftest import Podman

# The node's config: guest may log in through the port mapping (not loopback to the node).
RABBITMQ_CONF = """\
loopback_users.guest = false
listeners.tcp.default = 5672
cluster_partition_handling = pause_minority
"""
# Schedulers that do not spin while idle: this machine has two cores for everyone.
ERL_ARGS = "+sbwt none +sbwtdcpu none +sbwtdio none"
AMQP_HEADER = b"AMQP\x00\x00\x09\x01"
BOOT = 45.0  # a node answers within this of its start (5-14 s seen), or it hung
BOOT_RETRIES = 3  # restarts of a node hung at boot before the test gives up


@dataclass(frozen=True)
class Version:
    name: str  # as the suite's table says it: "4" or "3.10"
    image: str
    first_port: int  # node N listens on first_port + N - 1
    build: str  # what builds the image


VERSIONS = {
    "4": Version("4", "localhost/rabbitmq:4", 18781, "deploy/container/image.sh rabbitmq"),
    "3.10": Version(
        "3.10",
        "localhost/rabbitmq:3.10",
        18771,
        "deploy/container/image.sh rabbitmq --version 3",
    ),
}
VERSION_VARIABLE = "BRIDGE_CLUSTER_RABBITMQ"
# The nodes' Erlang net_ticktime: unset, Erlang's 60 s (a node cut off is noticed by its peers
# 45-75 s later; until then they wait for it, see the README of tests/cluster in the report).
TICKTIME_VARIABLE = "BRIDGE_CLUSTER_NET_TICKTIME"


DEFAULT_TICKTIME = 10


def net_ticktime() -> int | None:
    """``BRIDGE_CLUSTER_NET_TICKTIME``: the nodes' net_ticktime in seconds; unset: 10, as a
    cluster that must notice a cut-off node in seconds sets it (Erlang's default, 60, makes the
    other nodes hold declarations and a quorum queue's publishes for 45-75 s, for any client:
    ``60`` measures that)."""
    asked = os.environ.get(TICKTIME_VARIABLE, "").strip() or str(DEFAULT_TICKTIME)
    if asked == "60":
        return None
    if not asked.isdigit() or not 1 <= int(asked) <= 600:
        raise ValueError(f"{TICKTIME_VARIABLE}={asked}: seconds, 1-600")
    return int(asked)


def chosen_version() -> Version:
    """``BRIDGE_CLUSTER_RABBITMQ``: 4 or 4.x (4.0), 3 or 3.x (3.10, also when unset, as
    ``make`` has it)."""
    asked = os.environ.get(VERSION_VARIABLE, "").strip()
    if asked in ("", "3") or asked.startswith("3."):
        return VERSIONS["3.10"]
    if asked == "4" or asked.startswith("4."):
        return VERSIONS["4"]
    raise ValueError(f"{VERSION_VARIABLE}={asked}: 4 (4.0) or 3 (3.10)")


@dataclass(frozen=True)
class Node:
    index: int  # 1, 2, 3
    container: str  # also its hostname: the node is rabbit@<container>
    port: int  # on 127.0.0.1
    ip: str  # on the cluster's network

    @property
    def address(self) -> str:
        """How the bridge names it (``host:port``, its metric's and /readyz's ``node``)."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    @property
    def erlang(self) -> str:
        return f"rabbit@{self.container}"


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def amqp_answers(port: int, timeout: float = 2.0) -> bool:
    """Whether a RabbitMQ node answers the AMQP header on ``port`` with its Connection.Start
    (a method frame): up and accepting clients, not booting, paused or cut off."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.settimeout(timeout)
            s.sendall(AMQP_HEADER)
            return s.recv(1)[:1] == b"\x01"
    except OSError:
        return False


def taken_subnets() -> str:
    """The host's routes: a subnet named in them is in use (podman refuses one its own store
    already has, and the next candidate is tried)."""
    routes = subprocess.run(
        ["ip", "-o", "route"], capture_output=True, text=True, timeout=10, check=False
    )
    return routes.stdout


class Cluster:
    """Three RabbitMQ nodes on a podman network; see the module docstring."""

    def __init__(self, podman: Podman, version: Version, folder: Path) -> None:
        self.podman = podman
        self.version = version
        self.folder = folder
        self.prefix = podman.prefix
        self.network = f"{self.prefix}-net"
        self.cookie = uuid.uuid4().hex
        self.nodes: list[Node] = []
        self.network_made = False
        self.disconnected: set[int] = set()
        self.server_version = ""
        self.notes: list[str] = []  # what healing had to do beyond starting and connecting
        self.ticktime = net_ticktime()
        self.erl_args = ERL_ARGS
        if self.ticktime is not None:
            self.erl_args += f" -kernel net_ticktime {self.ticktime}"

    # -- bring-up and teardown -------------------------------------------------------------

    def up(self, seconds: float = 150) -> None:
        """Network, three nodes, clustered; checked with :meth:`check`."""
        deadline = time.monotonic() + seconds
        ports = [self.version.first_port + i for i in range(3)]
        busy = [p for p in ports if not port_free(p)]
        if busy:
            raise AssertionError(f"127.0.0.1 ports {busy} are in use: the cluster needs {ports}")
        unforward(*ports)
        subnet = self._make_network()
        conf = self.folder / "rabbitmq.conf"
        conf.write_text(RABBITMQ_CONF)
        conf.chmod(0o644)
        self.folder.chmod(0o755)
        self.nodes = [
            Node(i, f"{self.prefix}-rmq{i}", ports[i - 1], f"{subnet}.{10 + i}") for i in (1, 2, 3)
        ]
        for node in self.nodes:
            self._run(node, conf)
        for node in self.nodes:
            self.wait_amqp(node, max(1.0, deadline - time.monotonic()))
        first = self.nodes[0]
        for node in self.nodes[1:]:
            self.ctl(node, "stop_app")
            self.ctl(node, "join_cluster", first.erlang)
            self.ctl(node, "start_app")
        self.check(max(1.0, deadline - time.monotonic()))
        self.server_version = self.ctl(first, "version").stdout.strip()

    def _make_network(self) -> str:
        """A podman network on a /24 of 10.89.0.0/16 that nothing here uses; its first three
        octets."""
        taken = taken_subnets()
        candidates = [n for n in range(100, 250) if f"10.89.{n}." not in taken]
        refusals = []
        for third in random.sample(candidates, min(5, len(candidates))):
            made = self.podman(
                "network", "create", "--subnet", f"10.89.{third}.0/24", self.network, check=False
            )
            if made.returncode == 0:
                self.network_made = True
                return f"10.89.{third}"
            refusals.append(made.stderr.strip())
        raise AssertionError(f"no free subnet for the cluster's network: {refusals}")

    def _run(self, node: Node, conf: Path) -> None:
        self.podman.containers.append(node.container)
        # Every node's name in /etc/hosts, so no node depends on the network's DNS: a peer that
        # cannot resolve a restarting node for a moment can leave Erlang's `global` stuck, and
        # the restarting node hangs at boot (rabbitmq-server#5438, #6034; 3.10.8 on OTP 25).
        hosts = [f"--add-host={n.container}:{n.ip}" for n in self.nodes]
        self.podman(
            "run",
            "-d",
            "--init",  # SIGTERM reaches rabbitmq-server: `podman stop` is a graceful stop
            "--name",
            node.container,
            "--hostname",
            node.container,
            "--network",
            self.network,
            "--ip",
            node.ip,
            *hosts,
            "-p",
            f"127.0.0.1:{node.port}:5672",
            "-e",
            f"RABBITMQ_ERLANG_COOKIE={self.cookie}",
            "-e",
            f"RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS={self.erl_args}",
            "-v",
            f"{conf}:/etc/rabbitmq/rabbitmq.conf:ro",
            self.version.image,
            # Not Debian's /usr/sbin wrapper, which sends the log to a file: `podman logs`.
            "/usr/lib/rabbitmq/bin/rabbitmq-server",
        )

    def close(self) -> None:
        """Keep each node's log (in ``folder``), then remove the containers and the network."""
        for node in self.nodes:
            with contextlib.suppress(Exception):
                (self.folder / f"rmq{node.index}.log").write_text(self.podman.logs(node.container))
        self.podman.clean()
        if self.network_made:
            self.podman("network", "rm", "-f", self.network, check=False)

    def leftovers(self) -> list[str]:
        """Containers, pods, volumes or networks of this cluster's prefix still in the store."""
        return sorted(name for name in self.podman.listed() if self.prefix in name)

    # -- commands ------------------------------------------------------------------------------

    def ctl(
        self, node: Node, *args: str, tool: str = "rabbitmqctl", timeout: float = 90
    ) -> subprocess.CompletedProcess[str]:
        """``tool -q args`` in ``node``'s container; raises unless it succeeds."""
        return self.podman("exec", node.container, tool, "-q", *args, timeout=timeout)

    def status(self, node: Node) -> dict[str, Any]:
        """``rabbitmqctl cluster_status`` as ``node`` sees it."""
        done = self.ctl(node, "cluster_status", "--formatter", "json", timeout=60)
        found: dict[str, Any] = json.loads(done.stdout)
        return found

    def running(self, node: Node) -> bool:
        state = self.podman("inspect", "--format", "{{.State.Running}}", node.container)
        return state.stdout.strip() == "true"

    def wait_amqp(self, node: Node, seconds: float = 90) -> float:
        """Wait until ``node`` answers AMQP on its port; the seconds it took."""
        started = time.monotonic()
        deadline = started + seconds
        while time.monotonic() < deadline:
            if amqp_answers(node.port):
                return time.monotonic() - started
            time.sleep(0.25)
        raise AssertionError(f"{node.container} did not answer AMQP within {seconds:.0f} s")

    def check(self, seconds: float = 60) -> None:
        """All three containers running and answering AMQP; clustered, with no partition, as
        each node sees it. Retried until ``seconds`` have passed (a node that just came back
        may not see the others yet)."""
        deadline = time.monotonic() + seconds
        problem = ""
        while True:
            problem = self._problem()
            if not problem or time.monotonic() > deadline:
                break
            time.sleep(1.0)
        if problem:
            raise AssertionError(f"the cluster is not healthy: {problem}")

    def _problem(self) -> str:
        for node in self.nodes:
            if not self.running(node):
                return f"{node.container} is not running"
            if not amqp_answers(node.port):
                return f"{node.container} does not answer AMQP on {node.port}"
        want = {n.erlang for n in self.nodes}
        for node in self.nodes:
            try:
                seen = self.status(node)
            except (AssertionError, ValueError, subprocess.TimeoutExpired) as exc:
                return f"cluster_status on {node.container} failed: {exc}"
            running = set(seen.get("running_nodes", []))
            if running != want:
                return f"{node.container} sees running nodes {sorted(running)}"
            if seen.get("partitions"):
                return f"{node.container} sees partitions {seen['partitions']}"
        return ""

    # -- faults --------------------------------------------------------------------------------

    def kill(self, node: Node) -> None:
        """SIGKILL: the node dies at once, no goodbye to its clients or peers."""
        self.podman("kill", "--signal", "KILL", node.container)

    def stop(self, node: Node) -> None:
        """A graceful stop (SIGTERM; SIGKILL only after 30 s)."""
        self.podman("stop", "-t", "30", node.container, timeout=60)

    def start(self, node: Node, seconds: float = BOOT) -> float:
        """Start a stopped or killed node and wait until it answers AMQP; the seconds it took.
        A node that hangs at boot is restarted, up to :data:`BOOT_RETRIES` times (and
        :attr:`notes` says so): 3.10.8 on Erlang 25 may hang in ``global`` when it rejoins
        (rabbitmq-server#6034, fixed in later 3.10 releases than Debian 12's); CI saw it
        twice in a row once."""
        started = time.monotonic()
        self.podman("start", node.container)
        self._until_up(node, seconds)
        return time.monotonic() - started

    def _until_up(self, node: Node, seconds: float) -> None:
        """Wait until a started node answers AMQP, restarting it while it hangs at boot."""
        for retry in range(BOOT_RETRIES + 1):
            try:
                self.wait_amqp(node, seconds)
                return
            except AssertionError:
                if retry == BOOT_RETRIES:
                    raise
            self.notes.append(
                f"node {node.index} did not answer within {seconds:.0f} s of its start "
                "(hung at boot): restarted"
            )
            self.podman("restart", "-t", "10", node.container, timeout=60)

    def disconnect(self, node: Node) -> None:
        """Cut the node off its network: its peers and its published port no longer reach it
        (packets go nowhere; nothing is closed)."""
        self.disconnected.add(node.index)
        self.podman("network", "disconnect", self.network, node.container)

    def connect(self, node: Node) -> None:
        """Connect a node cut off by :meth:`disconnect` again, at its old address."""
        self.podman("network", "connect", "--ip", node.ip, self.network, node.container)
        self.disconnected.discard(node.index)

    def await_quorum_plus_one(self, node: Node, seconds: int = 60) -> None:
        """Before stopping ``node`` in a rolling restart: wait until every quorum queue with a
        replica on it has a quorum and one more online (RabbitMQ's own upgrade check)."""
        self.ctl(
            node,
            "await_online_quorum_plus_one",
            "-t",
            str(seconds),
            tool="rabbitmq-upgrade",
            timeout=seconds + 30,
        )

    def heal(self, seconds: float = 150) -> None:
        """Every node connected and started again, then :meth:`check`. A node that does not
        answer within :data:`BOOT` s is restarted (:meth:`start` says how often)."""
        deadline = time.monotonic() + seconds
        for node in self.nodes:
            if node.index in self.disconnected:
                self.connect(node)
            if not self.running(node):
                self.podman("start", node.container)
        for node in self.nodes:
            self._until_up(node, BOOT)
        self.check(max(1.0, deadline - time.monotonic()))

    def node_at(self, address: str) -> Node:
        """The node the bridge names ``host:port``."""
        for node in self.nodes:
            if node.address == address:
                return node
        raise AssertionError(f"no node at {address}")

    @property
    def urls(self) -> str:
        """``BRIDGE_AMQP_URL`` for the whole cluster: every node, comma-separated."""
        return ",".join(node.url for node in self.nodes)
