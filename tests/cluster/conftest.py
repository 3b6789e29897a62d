"""The cluster fault suite's fixtures: one 3-node RabbitMQ cluster per module (podman), healed
after every test, removed at the end with nothing left behind; and its table, one row per fault,
printed at the end and written to ``.local/cluster-faults-<version>.md``.

The version: ``BRIDGE_CLUSTER_RABBITMQ=4`` (``localhost/rabbitmq:4``) or ``3`` (3.10, the
default); ``make test-cluster RABBITMQ=4|3`` builds the image and sets it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.broker_node import podman_environment
from tests.cluster.cluster import Cluster, chosen_version
from tests.image.conftest import Podman
from tests.rig import FAULT_COLUMNS, fault_cells

ROWS: list[dict[str, Any]] = []
RUN: dict[str, Any] = {}
LOCAL = Path(__file__).resolve().parents[2] / ".local"
COLUMNS = (
    *FAULT_COLUMNS,
    "resumed on another node",
    "via outbox",
    "other answers",
    "nodes",
)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    try:
        version = chosen_version()
        podman = Podman(podman_environment())
        made = Cluster(podman, version, tmp_path_factory.mktemp("cluster"))
    except ValueError as exc:
        pytest.fail(str(exc))
    if podman("image", "exists", version.image, check=False).returncode != 0:
        pytest.fail(f"no image {version.image}: run `{version.build}` (make test-cluster does)")
    started = time.monotonic()
    RUN.update(version=version.name, image=version.image, started=started, logs=made.folder)
    try:
        made.up()
        RUN.update(
            server=made.server_version,
            bring_up=time.monotonic() - started,
            ticktime=made.ticktime or 60,
        )
        yield made
    finally:
        made.close()
        RUN.update(duration=time.monotonic() - started, notes=made.notes)
    left = made.leftovers()
    assert not left, f"left behind: {left}"


@pytest.fixture(autouse=True)
def healed(cluster: Cluster) -> Iterator[None]:
    """Every test leaves the cluster as it found it: three nodes running and clustered."""
    yield
    cluster.heal()


@pytest.fixture
def table() -> list[dict[str, Any]]:
    return ROWS


def cells(row: dict[str, Any]) -> tuple[str, ...]:
    resumed, direct = row["resumed"], row["direct_again"]
    again = "not at all" if direct is None else f"directly again after {direct:.1f} s"
    return (
        *fault_cells(row),
        f"{resumed:.1f} s" if resumed is not None else f"never ({again})",
        str(row["stored"]),
        ", ".join(f"{k}: {v}" for k, v in sorted(row["answers"].items()) if k != "200") or "-",
        row["nodes"] + "".join(f" ({note})" for note in row["notes"]),
    )


def markdown() -> str:
    server = RUN.get("server") or RUN.get("version", "?")
    lines = [
        f"RabbitMQ {server} ({RUN.get('image')}), 3 nodes in podman (net_ticktime "
        f"{RUN.get('ticktime', 60)} s), two bridge replicas; "
        f"bring-up {RUN.get('bring_up', 0):.0f} s, whole run {RUN.get('duration', 0):.0f} s "
        f"({time.strftime('%Y-%m-%d %H:%M')})",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    lines += ["| " + " | ".join(cells(row)) + " |" for row in ROWS]
    lines += ["", *(f"Note: {note}" for note in RUN.get("notes", []))] if RUN.get("notes") else []
    return "\n".join(lines) + "\n"


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not ROWS:
        return
    rows = [COLUMNS, *(cells(row) for row in ROWS)]
    widths = [max(len(line[i]) for line in rows) for i in range(len(COLUMNS))]
    terminalreporter.write_sep("=", f"cluster fault suite, RabbitMQ {RUN.get('server', '?')}")
    for n, line in enumerate(rows):
        terminalreporter.write_line(
            "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True))
        )
        if n == 0:
            terminalreporter.write_line("  ".join("-" * w for w in widths))
    tick = "" if RUN.get("ticktime", 60) == 60 else f"-ticktime{RUN['ticktime']}"
    out = LOCAL / f"cluster-faults-{RUN.get('version', 'x')}{tick}.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text(markdown())
    for note in RUN.get("notes", []):
        terminalreporter.write_line(f"note: {note}")
    terminalreporter.write_line(f"written to {out}; the nodes' logs in {RUN.get('logs')}")
