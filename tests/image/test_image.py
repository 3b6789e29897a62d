"""The container image, run as operators run it (``make test-image``; README, "Deploying").

Against the real broker, on the host's network, read-only (no tmpfs either), with no
capabilities: the image's contract; the README walkthrough through containers (challenge, a
signed Lightroom event, the message on ``adobe.events``); the HEALTHCHECK; ``podman stop`` →
exit 0; SIGKILL with a backlog in the outbox volume, then a new container on the same volume
that delivers every event; the Helm chart rendered as a sidecar Pod beside the example consumer
under ``podman kube play``; the compose file brought up through podman's Docker API.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import threading
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import orjson
import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography.hazmat.primitives import serialization

from tests.adobe_journal import JournalServer
from tests.conftest import ROOT
from tests.helpers import CLIENT_ID, EVENTS, KEY_PATH, KeyServer, SigningKey
from tests.image.conftest import IMAGE, Podman, http_json, record, wait_for
from tests.processes import free_port

pytestmark = pytest.mark.image

SAMPLE = EVENTS / "imaging_lightroom-job-status_succeeded.json"
LIGHTROOM = orjson.loads(SAMPLE.read_bytes())
MAX_IMAGE_BYTES = 300 * 1000 * 1000
CHART = ROOT / "deploy" / "helm" / "events-bridge"
JOURNAL_DIR = "/var/lib/events-bridge/journal"


def bridge_env(amqp_url: str, port: int) -> list[str]:
    env = {
        "BRIDGE_AMQP_URL": amqp_url,
        "BRIDGE_PORT": str(port),
        "BRIDGE_CLIENT_IDS": CLIENT_ID,
        "BRIDGE_KEY_BASE_URL": "file:///keys",
    }
    return [arg for name, value in env.items() for arg in ("-e", f"{name}={value}")]


def test_the_image_keeps_its_contract(podman: Podman) -> None:
    image = json.loads(podman("image", "inspect", IMAGE).stdout)[0]
    config = image["Config"]
    size = int(image["Size"])
    record(image_bytes=size)
    assert size < MAX_IMAGE_BYTES, f"{size / 1e6:.0f} MB"
    assert config["User"] == "10001:10001"
    assert config["Entrypoint"] == ["events-bridge"]
    assert config["Cmd"] == ["serve", "--config", "/etc/events-bridge/bridge.yaml"]
    env = dict(line.split("=", 1) for line in config["Env"])
    assert env["BRIDGE_HOST"] == "0.0.0.0"
    assert env["BRIDGE_OUTBOX_DIR"] == "/var/lib/events-bridge/outbox"
    assert env["BRIDGE_JOURNAL_STATE_DIR"] == JOURNAL_DIR
    assert not {"PIP_CERT", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE"} & set(env)
    assert "/var/lib/events-bridge/outbox" in config["Volumes"]
    assert JOURNAL_DIR in config["Volumes"]
    assert config["StopSignal"] in ("SIGTERM", "15")
    assert "8080/tcp" in config["ExposedPorts"]
    health = podman("image", "inspect", "--format", "{{json .HealthCheck}}", IMAGE).stdout
    assert "events-bridge-healthcheck" in health
    # pip itself is gone, the example consumer is there.
    listed = podman(
        "run", "--rm", "--entrypoint", "/bin/sh", IMAGE, "-c",
        "ls /opt/events-bridge/bin/pip 2>&1; ls /opt/events-bridge/examples/consumer.py",
    ).stdout  # fmt: skip
    assert "'/opt/events-bridge/bin/pip': No such file" in listed
    assert listed.splitlines()[-1] == "/opt/events-bridge/examples/consumer.py"


def certificates(pem: str) -> set[str]:
    """The base64 bodies of the certificates of a PEM bundle, one line each."""
    blocks = pem.split("-----BEGIN CERTIFICATE-----")[1:]
    return {"".join(b.split("-----END CERTIFICATE-----")[0].split()) for b in blocks}


def test_the_build_ca_bundle_is_in_no_layer(podman: Podman, tmp_path: Path) -> None:
    """The CA bundle pip trusted during the build (a build secret) is nowhere in the saved
    image: no certificate of it that Debian's own bundle lacks appears in any byte of it."""
    host = Path(os.environ.get("CA_BUNDLE") or "/etc/ssl/certs/ca-certificates.crt")
    if not host.exists():
        pytest.skip(f"no CA bundle at {host} was given to the build")
    shipped = podman(
        "run", "--rm", "--entrypoint", "cat", IMAGE, "/etc/ssl/certs/ca-certificates.crt"
    ).stdout  # fmt: skip
    local = certificates(host.read_text()) - certificates(shipped)
    record(local_certificates_looked_for=len(local))
    if not local:
        pytest.skip("this machine's bundle has no certificate beyond Debian's: none to look for")
    archive = tmp_path / "image.tar"
    podman("save", "--format", "docker-archive", "-o", str(archive), IMAGE, timeout=300)
    # Uncompressed layers: a copied file would be there byte for byte (64-character lines).
    needles = {body[:64].encode() for body in local}
    with archive.open("rb") as data:
        tail = b""
        while chunk := data.read(1 << 24):
            window = tail + chunk
            found = [n for n in needles if n in window]
            assert not found, "a certificate of the build's CA bundle is in the image"
            tail = window[-128:]


def private_key_file(signer: SigningKey, keys: Path) -> str:
    """The signer's private key beside its public one (a throw-away test key)."""
    folder = keys / "private"
    folder.mkdir(mode=0o755, exist_ok=True)
    pem = signer.private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    (folder / "key.pem").write_bytes(pem)
    (folder / "key.pem").chmod(0o644)
    return "/keys/private/key.pem"


def test_the_readme_walkthrough_through_the_container(
    podman: Podman, amqp_url: str, signing: tuple[SigningKey, Path], tmp_path: Path
) -> None:
    signer, keys = signing
    key = private_key_file(signer, keys)
    port = free_port()
    started = time.monotonic()
    name = podman.run(
        "walkthrough",
        *bridge_env(amqp_url, port),
        "-v", f"{keys}:/keys:ro",
        "-v", f"{podman.volume('outbox')}:/var/lib/events-bridge/outbox",
    )  # fmt: skip
    wait_for(f"http://127.0.0.1:{port}/readyz", {"broker": "connected"})
    record(ready_seconds=round(time.monotonic() - started, 2))

    # As an operator's container: uid 10001, no capabilities, nothing writable but the volumes
    # (the journal's is the image's own VOLUME here: no -v names it).
    inside = podman(
        "exec", name, "/bin/sh", "-c",
        "id -u; grep CapEff /proc/1/status; touch /etc/x /tmp/x 2>&1; "
        "touch /var/lib/events-bridge/outbox/probe && echo outbox-writable; "
        f"touch {JOURNAL_DIR}/probe && echo journal-writable",
    ).stdout  # fmt: skip
    assert inside.splitlines()[0] == "10001"
    assert "CapEff:\t0000000000000000" in inside
    assert inside.count("Read-only file system") == 2
    assert "outbox-writable" in inside
    assert "journal-writable" in inside

    healthy = podman("healthcheck", "run", name, check=False)
    assert healthy.returncode == 0, healthy.stderr
    state = podman.inspect(name)["State"]
    assert (state.get("Health") or state.get("Healthcheck"))["Status"] == "healthy"

    # A second terminal: `events-bridge tail`, in a container of the image.
    tail = podman.run(
        "tail", "-e", f"BRIDGE_AMQP_URL={amqp_url}",
        command=("tail", "--json", "--count", "1", "--timeout", "60", "lightroom-job-status.#"),
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while "tail: bound" not in podman.logs(tail):
        assert time.monotonic() < deadline, podman.logs(tail)
        time.sleep(0.1)

    # A third: Adobe, as `events-bridge simulate` plays it, in a container of the image.
    sent = podman(
        "run", "--rm", "--network", "host", "--read-only", "--cap-drop", "ALL",
        "-v", f"{keys}:/keys:ro", "-v", f"{SAMPLE}:/sample.json:ro",
        IMAGE, "simulate", "--url", f"http://127.0.0.1:{port}/webhook",
        "--key", key, "--key-path", KEY_PATH, "--client-id", CLIENT_ID, "/sample.json",
    )  # fmt: skip
    assert f"POST {LIGHTROOM['event_id']}: 200" in sent.stdout + sent.stderr

    podman("wait", tail, timeout=90)
    printed = [line for line in podman.logs(tail).splitlines() if line.startswith("{")]
    assert len(printed) == 1, podman.logs(tail)
    message = json.loads(printed[0])
    assert message["routing_key"] == "lightroom-job-status.succeeded"
    assert LIGHTROOM["event_id"] in json.dumps(message)

    # SIGTERM: drained and exited 0, quickly.
    started = time.monotonic()
    podman("stop", "-t", "40", name, timeout=60)
    stop_seconds = time.monotonic() - started
    record(stop_seconds=round(stop_seconds, 2))
    assert podman.inspect(name)["State"]["ExitCode"] == 0
    assert stop_seconds < 15  # idle: nothing to drain (0.2 s here); far from the kill at 40 s
    logs = podman.logs(name)
    assert "bridge_stopped" in logs
    assert "Traceback" not in logs


def cloud_event(code: str, event_id: str) -> bytes:
    return orjson.dumps(
        {
            "specversion": "1.0",
            "type": code,
            "source": "urn:test",
            "id": f"ce-{event_id}",
            "eventid": event_id,
            "recipientclientid": CLIENT_ID,
            "data": {"n": event_id},
        }
    )


async def post_all(url: str, signer: SigningKey, bodies: dict[str, bytes]) -> dict[str, Any]:
    answers: dict[str, Any] = {}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        for event_id, body in bodies.items():
            async with session.post(url, data=body, headers=signer.headers(body)) as response:
                answers[event_id] = (response.status, await response.json())
    return answers


async def watch_shipped_topology(
    podman: Podman, channel: aio_pika.abc.AbstractChannel, amqp_url: str, code: str
) -> aio_pika.abc.AbstractQueue:
    """The shipped topology declared through the image's ``declare``, then an exclusive queue
    bound to it for the events of ``code``."""
    await asyncio.to_thread(
        podman, "run", "--rm", "--network", "host", "-e", f"BRIDGE_AMQP_URL={amqp_url}",
        "-e", f"BRIDGE_CLIENT_IDS={CLIENT_ID}", IMAGE, "declare",
    )  # fmt: skip
    queue = await channel.declare_queue(exclusive=True)
    await queue.bind("adobe.events", routing_key=f"{code}.#")
    return queue


async def test_sigkill_with_a_backlog_then_a_new_container_delivers_every_event(
    podman: Podman, amqp_url: str, signing: tuple[SigningKey, Path]
) -> None:
    signer, keys = signing
    code = f"image-test-{uuid.uuid4().hex[:8]}"
    volume = podman.volume("backlog")
    mounts = ["-v", f"{keys}:/keys:ro", "-v", f"{volume}:/var/lib/events-bridge/outbox"]
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        queue = await watch_shipped_topology(podman, channel, amqp_url, code)

        # The broker is away (nothing listens on that port): every event goes to the outbox.
        away = f"amqp://guest:guest@127.0.0.1:{free_port()}/"
        port = free_port()
        first = podman.run("backlog-1", *bridge_env(away, port), *mounts)
        await asyncio.to_thread(wait_for, f"http://127.0.0.1:{port}/readyz", {"outbox": "usable"})
        bodies = {f"{code}-{i:03d}": cloud_event(code, f"{code}-{i:03d}") for i in range(40)}
        answers = await post_all(f"http://127.0.0.1:{port}/webhook", signer, bodies)
        assert {status for status, _ in answers.values()} == {200}
        assert {answer["status"] for _, answer in answers.values()} == {"stored"}
        _, ready = await asyncio.to_thread(http_json, f"http://127.0.0.1:{port}/readyz")
        assert ready["outbox_depth"] == len(bodies)

        podman("kill", "--signal", "KILL", first)
        podman("wait", first)
        assert podman.inspect(first)["State"]["ExitCode"] == 137

        # A new container on the same volume, with the broker: it replays every event.
        port = free_port()
        podman.run("backlog-2", *bridge_env(amqp_url, port), *mounts)
        await asyncio.to_thread(
            wait_for,
            f"http://127.0.0.1:{port}/readyz",
            {"broker": "connected", "outbox_depth": 0},
        )
        got: dict[str, bytes] = {}
        copies = 0
        deadline = time.monotonic() + 30
        while len(got) < len(bodies) and time.monotonic() < deadline:
            message = await queue.get(no_ack=True, fail=False)
            if message is None:
                await asyncio.sleep(0.05)
                continue
            copies += 1
            got[message.message_id or ""] = message.body
    record(sigkill_backlog={"sent": len(bodies), "delivered": len(got), "copies": copies})
    assert got == bodies  # every event, byte for byte, and nothing else


def metric_value(port: int, sample: str) -> float | None:
    """The value of ``sample`` (a series with its labels) on the daemon's /metrics, or None."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as answer:
            text = answer.read().decode()
    except OSError:
        return None
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        if name == sample:
            return float(value)
    return None


def wait_metric(port: int, sample: str, want: float, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while (found := metric_value(port, sample)) != want:
        assert time.monotonic() < deadline, f"{sample}: {found}, not {want}"
        time.sleep(0.2)


def journal_started(podman: Podman, name: str) -> dict[str, Any]:
    lines = [json.loads(line) for line in podman.logs(name).splitlines() if line.startswith("{")]
    (started,) = [line for line in lines if line.get("event") == "journal_started"]
    assert not [line for line in lines if line.get("event") == "journal_not_started"]
    assert isinstance(started, dict)
    return started


async def test_the_journal_position_is_kept_on_its_volume_across_containers(
    podman: Podman, amqp_url: str, signing: tuple[SigningKey, Path]
) -> None:
    """Read-only root, no capabilities: the journal (a local Adobe journal and IMS on the host's
    loopback) is pulled, its position kept in the volume on /var/lib/events-bridge/journal; a new
    container on that volume resumes after it and publishes nothing again."""
    _, keys = signing
    code = f"image-journal-{uuid.uuid4().hex[:8]}"
    volume = podman.volume("journal")
    with JournalServer(retry_after=0.5) as journal:
        bodies = {f"{code}-{i}": cloud_event(code, f"{code}-{i}") for i in range(3)}
        for body in bodies.values():
            journal.add(orjson.loads(body))
        env = {
            "BRIDGE_JOURNAL_URL": journal.journal_url,
            "BRIDGE_JOURNAL_START": "oldest",
            "BRIDGE_IMS_TOKEN_URL": journal.token_url,
            "BRIDGE_IMS_CLIENT_ID": journal.client_id,
            "BRIDGE_IMS_CLIENT_SECRET": journal.client_secret,
            "BRIDGE_IMS_ORG_ID": journal.org_id,
        }
        args = [arg for name, value in env.items() for arg in ("-e", f"{name}={value}")]
        mounts = ["-v", f"{keys}:/keys:ro", "-v", f"{volume}:{JOURNAL_DIR}"]
        connection = await aio_pika.connect(amqp_url)
        async with connection:
            channel = await connection.channel()
            queue = await watch_shipped_topology(podman, channel, amqp_url, code)

            port = free_port()
            first = podman.run("journal-1", *bridge_env(amqp_url, port), *args, *mounts)
            await asyncio.to_thread(wait_metric, port, "bridge_journal_events_total", 3.0)
            await asyncio.to_thread(
                wait_metric, port, 'bridge_journal_pages_total{result="empty"}', 1.0
            )
            kept = podman("exec", first, "ls", "-A", JOURNAL_DIR).stdout.split()
            assert ".lock" in kept
            assert len([f for f in kept if f.startswith("position-")]) == 1, kept
            podman("stop", "-t", "40", first, timeout=60)
            assert podman.inspect(first)["State"]["ExitCode"] == 0
            assert journal_started(podman, first)["resume_after"] is None

            # A new container on the same volume: it resumes after the last event.
            port = free_port()
            second = podman.run("journal-2", *bridge_env(amqp_url, port), *args, *mounts)
            await asyncio.to_thread(
                wait_metric, port, 'bridge_journal_pages_total{result="empty"}', 1.0
            )
            assert journal_started(podman, second)["resume_after"] == journal.positions[-1]
            assert metric_value(port, "bridge_journal_events_total") == 0.0
            podman("stop", "-t", "40", second, timeout=60)

            got: list[str] = []
            await asyncio.sleep(0.5)
            while (message := await queue.get(no_ack=True, fail=False)) is not None:
                got.append(message.message_id or "")
    assert sorted(got) == sorted(bodies)  # each event once, none again from the second


def failed_job(job: str) -> bytes:
    """A signed Lightroom event of a failed job, which the example consumer prints."""
    return orjson.dumps(
        {
            **LIGHTROOM,
            "event_id": f"event-{job}",
            "recipient_client_id": CLIENT_ID,
            "event": {
                **LIGHTROOM["event"],
                "body": {"jobId": job, "outputs": [{"status": "failed", "input": "/in.psd"}]},
            },
        }
    )


@pytest.fixture
async def key_server(
    aiohttp_server: Callable[[web.Application], Awaitable[TestServer]],
    signing: tuple[SigningKey, Path],
) -> str:
    """Public keys over HTTP on loopback (the Pod shares the host's network)."""
    keys = KeyServer()
    keys.keys[KEY_PATH] = signing[0].public_pem
    return str((await aiohttp_server(keys.app())).make_url("")).rstrip("/")


def render_sidecar(amqp_url: str, port: int, key_base_url: str, release: str, queue: str) -> str:
    """The chart's sidecar values, on this test's broker, keys, port and example queue."""
    import helm_python

    values = yaml.safe_load((CHART / "ci" / "sidecar-values.yaml").read_text())
    values["bridge"]["port"] = port
    values["bridge"]["keyBaseUrl"] = key_base_url
    values["bridge"]["clientIds"] = CLIENT_ID
    values["bridge"]["env"]["BRIDGE_AMQP_URL"] = amqp_url
    for container in values["sidecar"]["containers"]:
        for item in container.get("env", []):
            if item["name"] == "BRIDGE_AMQP_URL":
                item["value"] = amqp_url
        container["env"].append({"name": "EXAMPLE_QUEUE", "value": queue})
    rendered = helm_python.Chart.load(CHART).render(values, name=release, namespace="default")
    documents = [
        doc
        for path, text in sorted(rendered.items())
        if path.endswith(".yaml")
        for doc in yaml.safe_load_all(text)
        if doc
    ]
    return yaml.safe_dump_all(documents)


@pytest.fixture
async def example_queue(amqp_url: str) -> AsyncIterator[str]:
    """The example consumer's queue for one test, and what it declares beside it, deleted after:
    a developer's broker keeps no test queue, and a developer's own example consumer on
    ``examples.failed-jobs`` neither races the test nor loses a message to it."""
    queue = f"examples.test-{uuid.uuid4().hex[:8]}"
    yield queue
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        for name in (queue, f"{queue}.dead", f"{queue}.retry"):
            await channel.queue_delete(name)
        await channel.exchange_delete(f"{queue}.dlx")


@pytest.fixture
async def played(podman: Podman, tmp_path: Path) -> AsyncIterator[Callable[[str], Awaitable[str]]]:
    """``podman kube play`` of a YAML text; ``kube down`` and its volumes removed afterwards."""
    files: list[Path] = []

    async def play(text: str) -> str:
        file = tmp_path / f"pod-{len(files)}.yaml"
        file.write_text(text)
        files.append(file)
        return (await asyncio.to_thread(podman, "kube", "play", str(file))).stdout

    yield play
    for file in files:
        podman("kube", "down", str(file), check=False)


async def test_the_chart_as_a_sidecar_pod_beside_the_example_consumer(
    podman: Podman,
    amqp_url: str,
    signing: tuple[SigningKey, Path],
    key_server: str,
    played: Callable[[str], Awaitable[str]],
    example_queue: str,
) -> None:
    signer, _ = signing
    release = podman.name("pod")
    port = free_port()
    started = time.monotonic()
    await played(render_sidecar(amqp_url, port, key_server, release, example_queue))
    podman.volumes.append(f"{release}-events-bridge")  # kube down leaves the ConfigMap's volume
    pod = f"{release}-events-bridge-pod-0"
    await asyncio.to_thread(wait_for, f"http://127.0.0.1:{port}/readyz", {"broker": "connected"})
    record(kube_play_ready_seconds=round(time.monotonic() - started, 2))

    consumer = f"{pod}-consumer"
    deadline = time.monotonic() + 60
    while f"consuming {example_queue}" not in podman.logs(consumer):
        assert time.monotonic() < deadline, podman.logs(consumer)
        await asyncio.sleep(0.2)

    job = f"job-{uuid.uuid4().hex[:8]}"
    answers = await post_all(f"http://127.0.0.1:{port}/webhook", signer, {"one": failed_job(job)})
    assert answers["one"][0] == 200
    deadline = time.monotonic() + 30
    while f"job {job} failed" not in podman.logs(consumer):
        assert time.monotonic() < deadline, podman.logs(consumer)
        await asyncio.sleep(0.2)
    assert "Traceback" not in podman.logs(f"{pod}-events-bridge")


@pytest.fixture
def docker_api(podman: Podman, tmp_path: Path) -> Iterator[str]:
    """podman's Docker-compatible API on a socket of our own (stopped by its PID afterwards)."""
    socket = tmp_path / "podman.sock"
    service = subprocess.Popen(
        ["podman", "system", "service", "--time=0", f"unix://{socket}"],
        env=podman.env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while not socket.exists():
            assert service.poll() is None, "podman system service ended"
            assert time.monotonic() < deadline, "no podman API socket"
            time.sleep(0.1)
        yield f"unix://{socket}"
    finally:
        service.terminate()
        try:
            service.wait(timeout=30)
        except subprocess.TimeoutExpired:
            service.kill()
            service.wait(timeout=30)


class Healthchecks(threading.Thread):
    """What a Docker engine does by itself and podman 4.3 leaves to systemd timers: run the
    HEALTHCHECKs of a compose project's containers (every second here), so that compose's
    ``service_healthy`` holds."""

    def __init__(self, podman: Podman, project: str) -> None:
        super().__init__(daemon=True)
        self.podman, self.project, self.done = podman, project, threading.Event()

    def run(self) -> None:
        label = f"label=com.docker.compose.project={self.project}"
        while not self.done.wait(1.0):
            listed = self.podman("ps", "-q", "--filter", label, check=False, timeout=30)
            for container in listed.stdout.split():
                self.podman("healthcheck", "run", container, check=False, timeout=30)


def test_the_compose_file_brings_up_broker_bridge_and_consumer(
    podman: Podman, docker_api: str, signing: tuple[SigningKey, Path]
) -> None:
    if shutil.which("docker-compose") is None:
        pytest.fail("docker-compose is missing: make test-image installs it (apt)")
    signer, keys = signing
    podman("image", "exists", "localhost/rabbitmq:4")  # deploy/container/image.sh rabbitmq
    project, port = podman.name("compose").replace("-", ""), free_port()
    env = {
        **podman.env,
        "DOCKER_HOST": docker_api,
        "EVENTS_BRIDGE_IMAGE": IMAGE,
        "RABBITMQ_IMAGE": "localhost/rabbitmq:4",
        "BRIDGE_PUBLISHED_PORT": str(port),
        "RABBITMQ_MANAGEMENT_PORT": str(free_port()),
        "BRIDGE_DEV_KEYS": str(keys),
        "BRIDGE_CLIENT_IDS": CLIENT_ID,
    }
    compose = ["docker-compose", "-p", project, "-f", str(ROOT / "deploy" / "compose.yaml")]

    def run(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*compose, *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
        )

    checks = Healthchecks(podman, project)
    checks.start()
    started = time.monotonic()
    try:
        up = run("up", "-d")
        assert up.returncode == 0, up.stderr
        wait_for(f"http://127.0.0.1:{port}/readyz", {"broker": "connected"})
        record(compose_up_seconds=round(time.monotonic() - started, 1))
        deadline = time.monotonic() + 60
        while "consuming examples.failed-jobs" not in run("logs", "consumer").stdout:
            assert time.monotonic() < deadline, run("logs").stdout[-3000:]
            time.sleep(0.5)
        job = f"job-{uuid.uuid4().hex[:8]}"
        answers = asyncio.run(
            post_all(f"http://127.0.0.1:{port}/webhook", signer, {"one": failed_job(job)})
        )
        assert answers["one"][0] == 200, answers
        deadline = time.monotonic() + 30
        while f"job {job} failed" not in run("logs", "consumer").stdout:
            assert time.monotonic() < deadline, run("logs").stdout[-3000:]
            time.sleep(0.5)
    finally:
        checks.done.set()
        down = run("down", "-v", "-t", "40")
        checks.join(timeout=60)
    assert down.returncode == 0, down.stderr
