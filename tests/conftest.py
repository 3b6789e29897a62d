"""Fixtures: a real RabbitMQ broker for the session, found as the Makefile finds it."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from bridge.config import BrokerConfig
from tests.broker_node import BrokerNode, node_for, version_under_test

ROOT = Path(__file__).resolve().parent.parent
pytest_plugins = ["tests.journal_fixtures"]  # a local journal for the journal's tests


def _docker_answers() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        return (
            subprocess.run(
                ["docker", "info"], capture_output=True, timeout=10, check=False
            ).returncode
            == 0
        )
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="session")
def amqp_url() -> Iterator[str]:
    """The broker URL: the env URL, else testcontainers where Docker answers, else a local node
    (``BRIDGE_TEST_RABBITMQ=4``: the RabbitMQ 4 container of ``deploy/broker.sh``)."""
    url = os.environ.get("BRIDGE_TEST_AMQP_URL") or os.environ.get("BRIDGE_AMQP_URL")
    if url:
        yield url
        return
    if _docker_answers() and version_under_test() == "3":
        from testcontainers.rabbitmq import RabbitMqContainer

        with RabbitMqContainer("rabbitmq:3-management") as container:
            host = container.get_container_host_ip()
            port = container.get_exposed_port(container.port)
            yield f"amqp://guest:guest@{host}:{port}/"
        return
    version = ["--version", "4"] if version_under_test() == "4" else []
    found = subprocess.run(
        [str(ROOT / "deploy" / "broker.sh"), "ensure", *version],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if found.returncode != 0:
        pytest.fail(f"no RabbitMQ broker could be found or started:\n{found.stderr}")
    yield found.stdout.strip()


@pytest.fixture(scope="session")
def broker_node(amqp_url: str) -> BrokerNode:
    """The private node of ``deploy/broker.sh`` behind ``amqp_url``, which a test may stop, kill
    and put under alarms (``tests/broker_node.py``); the test is skipped, saying why, without."""
    found = node_for(amqp_url)
    if isinstance(found, str):
        pytest.skip(found)
    return found


@pytest.fixture
def forget_topology(amqp_url: str) -> Iterator[list[BrokerConfig]]:
    """Tests append the broker configs they used; their exchanges and queue go afterwards, so a
    developer's private node does not collect thousands of test queues."""
    used: list[BrokerConfig] = []
    yield used
    if not used:
        return

    async def delete() -> None:
        import aio_pika

        connection = await aio_pika.connect(amqp_url)
        async with connection:
            for config in used:
                channel = await connection.channel()
                await channel.queue_delete(config.unrouted_queue)
                await channel.exchange_delete(config.exchange)
                await channel.exchange_delete(config.unrouted_exchange)

    # A thread of its own: this teardown may run while a test's event loop still exists.
    with ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, delete()).result(timeout=60)


@pytest.fixture
async def rig(amqp_url: str, tmp_path: Path) -> AsyncIterator[Any]:
    """A real daemon behind a TCP proxy on the real broker (``tests/rig.py``)."""
    from tests.rig import make_rig

    async with make_rig(amqp_url, tmp_path) as made:
        yield made


@pytest.fixture
def fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """What each ``os.fsync`` made durable: the path behind the descriptor, in order."""
    calls: list[str] = []
    real = os.fsync

    def spy(fd: int) -> None:
        calls.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    return calls
