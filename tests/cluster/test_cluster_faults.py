"""The fault suite on a cluster (``make test-cluster RABBITMQ=4|3``): node faults under load.

A 3-node RabbitMQ cluster in podman (``tests/cluster/cluster.py``), two bridge replicas whose
``BRIDGE_AMQP_URL`` lists the three nodes, each with its own outbox, port and Adobe-like sender
(``tests/cluster/replicas.py``), the target queue a quorum queue on all three nodes. Each test
injects one fault into the node the replicas publish on while the load runs, and heals it. Then,
after every fault:

- LOSS = 0: every event answered 2xx is in the queue;
- PHANTOM = 0: nothing is in the queue that was not sent; bodies intact;
- every answer within 8 s, and every event answered 2xx in the end;
- each replica hit published again directly (not into its outbox) on another node within 10 s of
  the fault (a cut: within 3 net_ticktime, as the other nodes wait for the cut node that long;
  ``bridge_broker_node_info`` names another node and its direct publishes grow);
- both replicas alive, their logs free of tracebacks; the cluster healthy again (the
  ``healed`` fixture: three nodes running and clustered, no partition).

Duplicates are allowed (at least once) and counted. Rows go to the table printed at the end
and written to ``.local/cluster-faults-<version>.md``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.cluster.cluster import Cluster
from tests.cluster.replicas import RESUME_WITHIN, Fleet, Mark

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(300)]

DOWN_FOR = 8.0  # a killed or stopped node is started again after this
CUT_FOR = 20.0  # a node cut off is connected again after this: longer than RESUME_WITHIN
# The cut runs last: its aftermath is the likeliest to upset a later restart (on 3.10.8, see
# Cluster.start), and pytest runs the tests in this order.


@pytest.fixture
async def fleet(cluster: Cluster, tmp_path: Path) -> AsyncIterator[Fleet]:
    made = Fleet(cluster, tmp_path)
    try:
        await asyncio.to_thread(made.start)
        yield made
    finally:
        await asyncio.to_thread(made.stop)
        await made.forget_topology()


async def check(
    fleet: Fleet, fault: str, marks: list[Mark], table: list[Any], within: float = RESUME_WITHIN
) -> None:
    fleet.check(fault, marks, await fleet.delivered(), table, within)


async def test_sigkill_of_the_node_in_use(fleet: Fleet, table: list[Any]) -> None:
    async def kill(fleet: Fleet) -> list[Mark]:
        node = fleet.node_in_use()
        mark = Mark(time.monotonic(), node)
        await asyncio.to_thread(fleet.cluster.kill, node)
        await asyncio.sleep(DOWN_FOR)
        await asyncio.to_thread(fleet.cluster.start, node)
        return [mark]

    await check(fleet, "node SIGKILL (podman kill)", await fleet.run(kill), table)


async def test_graceful_stop_of_the_node_in_use(fleet: Fleet, table: list[Any]) -> None:
    async def stop(fleet: Fleet) -> list[Mark]:
        node = fleet.node_in_use()
        mark = Mark(time.monotonic(), node)
        await asyncio.to_thread(fleet.cluster.stop, node)
        await asyncio.sleep(DOWN_FOR)
        await asyncio.to_thread(fleet.cluster.start, node)
        return [mark]

    await check(fleet, "node graceful stop (podman stop)", await fleet.run(stop), table)


async def test_rolling_restart_of_all_three_nodes(fleet: Fleet, table: list[Any]) -> None:
    async def rolling(fleet: Fleet) -> list[Mark]:
        marks = []
        for node in fleet.cluster.nodes:
            # RabbitMQ's check before taking a node down: its quorum queues keep a majority.
            await asyncio.to_thread(fleet.cluster.await_quorum_plus_one, node)
            hit = fleet.using(node)
            mark = Mark(time.monotonic(), node)
            await asyncio.to_thread(fleet.cluster.stop, node)
            if hit:
                marks.append(mark)
            await asyncio.to_thread(fleet.cluster.start, node)
            # Back in the cluster as every node sees it before the next goes down (3.10's
            # nodes could hang at boot, in Erlang's `global`, when the next stop came sooner).
            await asyncio.to_thread(fleet.cluster.check, 90)
        return marks

    await check(fleet, "rolling restart, 3 nodes", await fleet.run(rolling), table)


async def test_node_in_use_cut_off_then_reconnected(fleet: Fleet, table: list[Any]) -> None:
    async def cut(fleet: Fleet) -> list[Mark]:
        node = fleet.node_in_use()
        mark = Mark(time.monotonic(), node)
        await asyncio.to_thread(fleet.cluster.disconnect, node)
        await asyncio.sleep(CUT_FOR)
        await asyncio.to_thread(fleet.cluster.connect, node)
        return [mark]

    fault = f"node cut off {CUT_FOR:.0f} s (network disconnect)"
    # The load goes on for a while after the node is back: when the replicas publish directly
    # again, wherever, is in the table too.
    # The bridge leaves the silent node in about 4 s (its watchdog), but the other nodes hold a
    # quorum queue's publishes (3.10: new connections too) until they declare the cut node
    # down, net_ticktime and more. Publishing resumes once they have (measured with 10 s:
    # 11.8 s on 4.0.5, 22 s on 3.10.8).
    ticktime = fleet.cluster.ticktime or 60
    await check(fleet, fault, await fleet.run(cut, after=10.0), table, 3.0 * ticktime)
