"""``deploy/container/image.sh unforward``: the dead port forwards that a killed container leaves in
netavark's iptables chains are removed, for the given ports only, and never while the port answers.

A forward left by a container that died with its podman comes before the forward of the next
container published on the same host port, and sends its connections to an address nobody has:
that is how a CI run once found its RabbitMQ 4 broker "not accepting AMQP". The test builds such
rules in a chain of its own, named as netavark names them but hooked nowhere (no traffic of the
machine passes it), and removes the chain afterwards. Root and iptables only.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import uuid
from collections.abc import Iterator

import pytest

from tests.conftest import ROOT

SCRIPT = ROOT / "deploy" / "container" / "image.sh"

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("iptables") is None, reason="needs root and iptables"
)


def _iptables(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["iptables", "-t", "nat", *args], capture_output=True, text=True, check=check, timeout=30
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


JUMPS = "NETAVARK-HOSTPORT-DNAT"


@pytest.fixture
def chain() -> Iterator[str]:
    name = f"NETAVARK-DN-EB{uuid.uuid4().hex[:10].upper()}"
    _iptables("-N", name)
    made_jumps = _iptables("-N", JUMPS, check=False).returncode == 0  # else netavark's own
    try:
        yield name
    finally:
        for rule in _iptables("-S", JUMPS, check=False).stdout.splitlines():
            if rule.startswith(f"-A {JUMPS} ") and rule.endswith(f"-j {name}"):
                _iptables("-D", *rule.split()[1:], check=False)  # a jump of this test
        _iptables("-F", name, check=False)
        _iptables("-X", name, check=False)
        if made_jumps:
            _iptables("-X", JUMPS, check=False)


def _forward(chain: str, port: int, host: str = "127.0.0.1") -> None:
    _iptables(
        "-A", chain, "-d", f"{host}/32", "-p", "tcp", "--dport", str(port),
        "-j", "DNAT", "--to-destination", "10.88.255.254:5672",
    )  # fmt: skip


def _ports_in(chain: str) -> list[int]:
    rules = _iptables("-S", chain).stdout.split()
    return [int(rules[i + 1]) for i, word in enumerate(rules) if word == "--dport"]


def _dead_port_below_6553() -> int:
    """A port nothing answers on whose number, with a digit more, is a port too."""
    for port in range(6100, 6553):
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) != 0:
                return port
    raise AssertionError("every port from 6100 to 6552 answers")


def _unforward(*ports: int) -> str:
    done = subprocess.run(
        [str(SCRIPT), "unforward", *map(str, ports)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stderr


def test_the_dead_forwards_of_the_given_port_go_and_the_others_stay(chain: str) -> None:
    dead, other = _free_port(), _free_port()
    _forward(chain, dead)
    _forward(chain, other)
    _forward(chain, dead)  # a second container's rule for the same port
    said = _unforward(dead)
    assert _ports_in(chain) == [other]
    assert said.count(f"removed a dead port forward to 127.0.0.1:{dead}") == 2


def test_a_port_that_answers_keeps_its_forward(chain: str) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        live = int(listener.getsockname()[1])
        _forward(chain, live)
        assert _unforward(live) == ""
        assert _ports_in(chain) == [live]


def test_a_word_that_is_not_a_port_is_refused_in_one_line() -> None:
    command = [str(SCRIPT), "unforward", "5682;true"]
    done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=30)
    assert done.returncode == 1
    assert done.stderr == "image: error: unforward: '5682;true' is not a port number\n"


def test_only_the_port_named_and_only_its_forwards_from_loopback(chain: str) -> None:
    dead = _dead_port_below_6553()
    longer = dead * 10 + 1  # 6100 and 61001: "dpt:6100" must not catch "dpt:61001"
    _forward(chain, longer)
    _forward(chain, dead, host="10.1.2.3")  # published on another address: not ours
    _forward(chain, dead)
    _unforward(dead)
    assert _ports_in(chain) == [longer, dead]
    rules = _iptables("-S", chain).stdout
    assert "-d 10.1.2.3/32" in rules
    assert f"-d 127.0.0.1/32 -p tcp -m tcp --dport {dead} " not in rules


def test_a_jump_into_a_chain_left_without_the_port_goes_too(chain: str) -> None:
    dead, kept = _dead_port_below_6553(), _free_port()
    _forward(chain, dead)
    _forward(chain, kept, host="10.1.2.3")  # still there after: its jump stays
    for port in (dead, kept):
        _iptables("-A", JUMPS, "-p", "tcp", "--dport", str(port), "-j", chain)
    said = _unforward(dead)
    jumps = [r for r in _iptables("-S", JUMPS).stdout.splitlines() if r.endswith(f"-j {chain}")]
    assert [int(r.split("--dport ")[1].split()[0]) for r in jumps] == [kept]
    assert f"removed a dead jump for port {dead}" in said
