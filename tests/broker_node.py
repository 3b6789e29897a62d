"""The broker node that tests may stop, kill, restart and put under alarms.

``deploy/broker.sh`` starts it: by default RabbitMQ 3.10, a private node on the host
(``rabbitmqctl -n events-bridge@localhost``, 127.0.0.1:5672); with ``BRIDGE_TEST_RABBITMQ=4``
(``make test RABBITMQ=4``), RabbitMQ 4.0 in the podman container ``events-bridge-rabbitmq4``
(``podman exec … rabbitmqctl``, 127.0.0.1:5682). Tests take it through the ``broker_node``
fixture, which skips them, saying why, when the broker under test is not that node.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from yarl import URL

ROOT = Path(__file__).resolve().parent.parent
BROKER_SH = ROOT / "deploy" / "broker.sh"
RABBITMQCTL = Path("/usr/lib/rabbitmq/bin/rabbitmqctl")
NODE = "events-bridge@localhost"  # the private 3.10 node
CONTAINER = "events-bridge-rabbitmq4"  # the RabbitMQ 4 container


def version_under_test() -> str:
    """``3`` (the default broker) or ``4`` (``BRIDGE_TEST_RABBITMQ=4``, ``make … RABBITMQ=4``)."""
    wanted = os.environ.get("BRIDGE_TEST_RABBITMQ", "3") or "3"
    return "4" if wanted.startswith("4") else "3"


def podman_environment() -> dict[str, str]:
    """What ``deploy/container/image.sh env`` exports: the project's podman store."""
    printed = subprocess.run(
        [str(ROOT / "deploy" / "container" / "image.sh"), "env"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    words = shlex.split(printed)
    assert words[0] == "export", printed
    return dict(word.split("=", 1) for word in words[1:])


def unforward(*ports: int) -> None:
    """Drop the dead port forwards a killed container left on these host ports (image.sh's
    ``unforward``): one of them would come before the forward of the container about to publish
    there and send its connections nowhere. A no-op where nothing was left, or not as root."""
    subprocess.run(
        [str(ROOT / "deploy" / "container" / "image.sh"), "unforward", *map(str, ports)],
        check=True,
        timeout=60,
    )


@dataclass
class BrokerNode:
    """One of the two private nodes of ``deploy/broker.sh``; ``version`` is ``3`` or ``4``."""

    version: str
    env: dict[str, str] = field(default_factory=dict)  # podman's store, for version 4

    @property
    def port(self) -> int:
        return 5682 if self.version == "4" else 5672

    def ctl_command(self, *args: str) -> list[str]:
        if self.version == "4":
            return ["podman", "exec", CONTAINER, "rabbitmqctl", "-q", *args]
        return [str(RABBITMQCTL), "-q", "-n", NODE, *args]

    def run(self, *command: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            command,
            capture_output=True,
            text=True,
            env={**os.environ, **self.env},
            timeout=120,
            check=check,
        )

    def ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``rabbitmqctl ARGS`` on the node (about a second: the CLI boots a VM of its own)."""
        return self.run(*self.ctl_command(*args), check=check)

    def missing(self) -> str | None:
        """Why this node cannot be controlled from here, or None when it can."""
        tool = "podman" if self.version == "4" else str(RABBITMQCTL)
        if shutil.which(tool) is None:
            return f"needs {tool} to control the RabbitMQ {self.version} node of deploy/broker.sh"
        status = self.ctl("status", check=False)
        if status.returncode != 0:
            where = f"container {CONTAINER}" if self.version == "4" else f"node {NODE}"
            return f"needs the private {where} of deploy/broker.sh running: {status.stderr[-300:]}"
        return None

    def set_max_message_size(self, size: int) -> None:
        # 4.x reads the limit from a persistent term set at boot, 3.x from the application env.
        self.ctl(
            "eval",
            f"application:set_env(rabbit, max_message_size, {size}), "
            f"catch persistent_term:put(max_message_size, {size}), ok.",
        )

    @contextlib.contextmanager
    def max_message_size(self, size: int) -> Iterator[None]:
        """The node refuses messages over ``size`` bytes meanwhile, then its own limit again."""
        found = self.ctl("eval", "application:get_env(rabbit, max_message_size).").stdout
        number = re.search(r"\d+", found)
        assert number, f"max_message_size: {found!r}"
        self.set_max_message_size(size)
        try:
            yield
        finally:
            self.set_max_message_size(int(number.group()))

    def beam_pid(self) -> int | None:
        """The node's Erlang VM (``beam.smp``) as the host sees it, or None when not running."""
        if self.version == "3":
            pid_file = ROOT / ".local" / "rabbitmq" / "rabbit.pid"
            return int(pid_file.read_text().strip()) if pid_file.exists() else None
        inspected = self.run(
            "podman", "container", "inspect", "--format", "{{.State.Pid}}", CONTAINER, check=False
        )
        top = int(inspected.stdout.strip() or 0) if inspected.returncode == 0 else 0
        return _descendant_named(top, "beam.smp") if top else None

    def kill(self) -> None:
        """SIGKILL: the VM of the 3.10 node; the whole 4.x container (its init, then all)."""
        if self.version == "4":
            self.run("podman", "kill", "--signal", "KILL", CONTAINER)
            return
        pid = self.beam_pid()
        assert pid is not None, "the private node was not started from this checkout"
        os.kill(pid, signal.SIGKILL)

    def ensure(self) -> None:
        """Start the node again (``deploy/broker.sh ensure``) and wait until it answers."""
        args = ["--version", "4"] if self.version == "4" else []
        self.run(str(BROKER_SH), "ensure", *args)


def _descendant_named(top: int, name: str) -> int | None:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            children.setdefault(parent, []).append(int(stat.parent.name))
    todo = [top]
    while todo:
        pid = todo.pop()
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/comm").read_text().strip() == name:
                return pid
        todo.extend(children.get(pid, []))
    return None


def node_for(amqp_url: str) -> BrokerNode | str:
    """The private node behind ``amqp_url``, or why the broker under test is not one."""
    version = version_under_test()
    node = BrokerNode(version, podman_environment() if version == "4" else {})
    target = URL(amqp_url.split(",", maxsplit=1)[0].strip())
    if target.host not in ("127.0.0.1", "localhost") or (target.port or 5672) != node.port:
        return (
            f"the broker under test ({target.host}:{target.port}) is not the private RabbitMQ "
            f"{version} node of deploy/broker.sh (127.0.0.1:{node.port}) that these tests control"
        )
    return node.missing() or node


def broker_major(connection: Any) -> int:
    """The major version of the RabbitMQ behind an open aio-pika ``connection``."""
    version = connection.transport.connection.server_properties.get("version", b"3")
    text = version.decode() if isinstance(version, bytes) else str(version)
    return int(text.split(".", 1)[0])
