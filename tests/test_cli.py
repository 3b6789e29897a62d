"""The command line as an operator meets it: real processes, a real broker, real signals."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from bridge.config import BrokerConfig
from tests.conftest import ROOT
from tests.helpers import CLIENT_ID, EVENTS, KEY_PATH, SigningKey, key_folder
from tests.processes import Daemon, cli, free_port

SHIPPED = ROOT / "config" / "bridge.yaml"
LIGHTROOM = EVENTS / "imaging_lightroom-job-status_succeeded.json"


def test_every_command_has_help() -> None:
    for command in (
        [],
        ["serve"],
        ["check-config"],
        ["declare"],
        ["route"],
        ["simulate"],
        ["keys", "generate"],
        ["tail"],
    ):
        result = cli(*command, "--help")
        assert result.returncode == 0, command
        assert "usage: events-bridge" in result.stdout


def quick_start(help_text: str) -> list[str]:
    """The commands of a help text's quick start, each continued line joined to its first."""
    block = help_text[help_text.index("quick start") :].split("\n\n", maxsplit=1)[0]
    commands: list[str] = []
    for line in block.splitlines()[1:]:
        if line.startswith("      "):  # a continued line: the one before must end in a backslash
            assert commands[-1].endswith(" \\"), commands[-1]
            commands[-1] = commands[-1].removesuffix("\\") + line.strip()
        else:
            commands.append(line.split("#")[0].strip())
    return [" ".join(command.split()) for command in commands]


@pytest.mark.parametrize("command", [[], ["serve"]])
def test_the_quick_start_is_the_readmes(command: list[str]) -> None:
    """`--help` and `serve --help` show README's quick start, naming only files of the
    repository or what `make run` generates (.local/keys)."""
    result = cli(*command, "--help")
    assert result.returncode == 0
    commands = quick_start(result.stdout)
    assert commands[0] == "make run"
    readme = " ".join((ROOT / "README.md").read_text().replace("\\\n", " ").split())
    for line in commands[1:]:
        assert line in readme, line
    words = " ".join(commands).split()
    files = [word for word in words if word.startswith(("tests/", "config/", ".local/"))]
    assert files
    for name in files:
        assert name.startswith(".local/keys/") or (ROOT / name).is_file(), name


def test_check_config_accepts_the_shipped_file() -> None:
    result = cli("check-config", env={"BRIDGE_CLIENT_IDS": "a,b"})
    assert result.returncode == 0
    assert "valid" in result.stdout


def test_check_config_lists_every_problem_and_exits_78(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("server:\n  port: lots\nbroker:\n  colour: red\nregistrations: []\n")
    result = cli("check-config", "--config", str(bad))
    assert result.returncode == 78
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 3
    assert lines[0] == (
        f"{bad}: server.port: expected a whole number from 0 to 65535, got 'lots' (bad.yaml:2)"
    )
    assert "Traceback" not in result.stderr


def test_serve_with_a_bad_config_exits_78_with_one_line(tmp_path: Path) -> None:
    result = cli("serve", env={"BRIDGE_CLIENT_IDS": ""})
    assert result.returncode == 78
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(
        "events-bridge: invalid config config/bridge.yaml: registrations[0].client_ids:"
    )
    result = cli("serve", "--config", str(tmp_path / "missing.yaml"))
    assert result.returncode == 78
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["route", "/nonexistent.json"], "cannot read /nonexistent.json"),
        (
            [
                "simulate",
                "--url",
                "http://127.0.0.1:9/w",
                "--key",
                "/nope.pem",
                "--key-path",
                KEY_PATH,
                str(LIGHTROOM),
            ],
            "cannot read private key /nope.pem",
        ),
        (["keys", "generate", "/tmp", "--name", "../evil"], "key name '../evil' is not allowed"),
        (["keys", "generate", "/proc/no/such"], "cannot write keys into /proc/no/such"),
        (["tail", "x" * 300], "the binding key must be 1 to 255 bytes"),
    ],
)
def test_user_mistakes_end_in_one_clear_line(args: list[str], message: str) -> None:
    result = cli(*args, env={"BRIDGE_CLIENT_IDS": "x"})
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert message in line


def test_route_explains_where_an_event_goes() -> None:
    result = cli("route", str(LIGHTROOM))
    assert result.returncode == 0
    assert "event code: lightroom-job-status" in result.stdout
    assert "routing key lightroom-job-status.succeeded" in result.stdout


def test_keys_generate_writes_an_adobe_named_pair(tmp_path: Path) -> None:
    result = cli("keys", "generate", str(tmp_path), "--name", "dev")
    assert result.returncode == 0
    assert (
        (tmp_path / "prod" / "keys" / "pub-key-dev.pem")
        .read_bytes()
        .startswith(b"-----BEGIN PUBLIC KEY-----")
    )
    private = tmp_path / "private" / "pub-key-dev.key.pem"
    assert private.stat().st_mode & 0o077 == 0
    again = cli("keys", "generate", str(tmp_path), "--name", "dev")
    assert again.returncode == 1
    assert "already exists" in again.stderr


@pytest.fixture
def daemon_env(amqp_url: str, tmp_path: Path) -> dict[str, str]:
    return {
        "BRIDGE_AMQP_URL": amqp_url,
        "BRIDGE_CLIENT_IDS": CLIENT_ID,
        "BRIDGE_PORT": str(free_port()),
        "BRIDGE_LOG_FORMAT": "json",
        "PYTHONUNBUFFERED": "1",
    }


def isolated_config(tmp_path: Path, forget: list[BrokerConfig] | None = None) -> Path:
    """The shipped file with this test's own exchange and queue names."""
    prefix = f"cli.{time.monotonic_ns()}"
    if forget is not None:
        forget.append(
            BrokerConfig(
                exchange=f"{prefix}.events",
                unrouted_exchange=f"{prefix}.unrouted",
                unrouted_queue=f"{prefix}.unrouted",
            )
        )
    text = (
        SHIPPED.read_text()
        .replace("adobe.events", f"{prefix}.events")
        .replace("adobe.unrouted", f"{prefix}.unrouted")
    )
    path = tmp_path / "bridge.yaml"
    path.write_text(text)
    return path


@pytest.fixture
def daemon(
    tmp_path: Path, daemon_env: dict[str, str], forget_topology: list[BrokerConfig]
) -> Iterator[Daemon]:
    signer = SigningKey.generate()
    daemon_env["BRIDGE_KEY_BASE_URL"] = key_folder(tmp_path / "keys", signer)
    running = Daemon(isolated_config(tmp_path, forget_topology), daemon_env)
    running.signer = signer  # type: ignore[attr-defined]
    yield running
    if running.process.poll() is None:
        running.process.kill()
        running.process.communicate()


def test_the_readme_walkthrough_simulate_then_tail(daemon: Daemon, tmp_path: Path) -> None:
    """make run + tail + simulate with the Lightroom sample, as README's quick start says."""
    daemon.wait_ready()
    keys = cli("keys", "generate", str(tmp_path / "sim"), "--name", "sim")
    assert keys.returncode == 0
    # The daemon reads keys from its own folder: give it the simulator's public key too.
    sim_public = tmp_path / "sim" / "prod" / "keys" / "pub-key-sim.pem"
    (tmp_path / "keys" / "prod" / "keys" / "pub-key-sim.pem").write_bytes(sim_public.read_bytes())
    config = daemon.process.args[-1]  # type: ignore[index]
    tail = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bridge",
            "tail",
            "--config",
            str(config),
            "--count",
            "1",
            "--timeout",
            "30",
            "--json",
        ],
        cwd=ROOT,
        env={**os.environ, **daemon.env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert tail.stderr is not None
    assert "waiting for messages" in tail.stderr.readline()
    simulated = cli(
        "simulate",
        "--url",
        daemon.url + "/webhook",
        "--key",
        str(tmp_path / "sim" / "private" / "pub-key-sim.key.pem"),
        "--key-path",
        "/prod/keys/pub-key-sim.pem",
        "--client-id",
        CLIENT_ID,
        str(LIGHTROOM),
    )
    assert simulated.returncode == 0, simulated.stderr
    assert "1/1 deliveries accepted" in simulated.stdout
    out, _ = tail.communicate(timeout=30)
    message = json.loads(out)
    assert message["routing_key"] == "lightroom-job-status.succeeded"
    assert message["properties"]["message_id"] == "7b59cc70-88d7-4895-b204-87f5350a0cce"
    assert message["properties"]["delivery_mode"] == 2
    assert message["headers"]["job-status"] == "succeeded"
    assert message["headers"]["adobe-provider"] == "events-bridge-simulator"
    code, logs = daemon.stop()
    assert code == 0
    handled = [line for line in logs if line["event"] == "webhook_handled"]
    assert handled[0]["routing_key"] == "lightroom-job-status.succeeded"
    assert handled[0]["outcome"] == "published"
    assert {"event_id", "delivery_id", "event_code", "job_status", "duration_ms"} <= set(handled[0])


def test_simulate_batches_and_retries(daemon: Daemon, tmp_path: Path) -> None:
    daemon.wait_ready()
    keys = cli("keys", "generate", str(tmp_path / "keys"), "--name", "batch")
    assert keys.returncode == 0
    files = [str(p) for p in sorted(EVENTS.glob("imaging_*.json"))] * 3
    result = cli(
        "simulate",
        "--url",
        daemon.url + "/webhook",
        "--key",
        str(tmp_path / "keys" / "private" / "pub-key-batch.key.pem"),
        "--key-path",
        "/prod/keys/pub-key-batch.pem",
        "--client-id",
        CLIENT_ID,
        "--batch",
        "4",
        "--retry",
        "--time-scale",
        "0.001",
        *files,
    )
    assert result.returncode == 0, result.stderr
    assert "2/2 deliveries accepted (6 events)" in result.stdout
    assert daemon.stop()[0] == 0


class SlowKeys:
    """A key server that answers after a delay, to hold a request in flight."""

    def __init__(self, pem: bytes, delay: float) -> None:
        self.pem, self.delay = pem, delay

    async def handle(self, _request: web.Request) -> web.Response:
        await asyncio.sleep(self.delay)
        return web.Response(body=self.pem)


def test_sigterm_answers_in_flight_requests_then_exits_0(
    tmp_path: Path,
    daemon_env: dict[str, str],
    forget_topology: list[BrokerConfig],
) -> None:
    signer = SigningKey.generate()

    async def scenario() -> tuple[int, int, list[dict[str, Any]]]:
        app = web.Application()
        app.router.add_get("/{tail:.*}", SlowKeys(signer.public_pem, 1.5).handle)
        runner = web.AppRunner(app)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        daemon_env["BRIDGE_KEY_BASE_URL"] = f"http://127.0.0.1:{port}"
        daemon = Daemon(isolated_config(tmp_path, forget_topology), daemon_env)
        try:
            await asyncio.to_thread(daemon.wait_ready)
            body = json.dumps(
                {**json.loads(LIGHTROOM.read_bytes()), "recipientclientid": CLIENT_ID}
            ).encode()
            async with aiohttp.ClientSession() as session:
                request = asyncio.create_task(
                    session.post(daemon.url + "/webhook", data=body, headers=signer.headers(body))
                )
                await asyncio.sleep(0.5)  # the request now waits for the slow key server
                daemon.process.send_signal(signal.SIGTERM)
                response = await request
                status = response.status
            code, logs = await asyncio.to_thread(daemon.stop)
            return status, code, logs
        finally:
            if daemon.process.poll() is None:
                daemon.process.kill()
            await runner.cleanup()

    status, code, logs = asyncio.run(scenario())
    assert status == 200
    assert code == 0
    events = [line["event"] for line in logs]
    assert (
        events.index("bridge_stopping")
        < events.index("webhook_handled")
        < events.index("bridge_stopped")
    )


def test_declare_creates_the_topology(tmp_path: Path, amqp_url: str) -> None:
    config = isolated_config(tmp_path)
    result = cli("declare", "--config", str(config), env={"BRIDGE_AMQP_URL": amqp_url})
    assert result.returncode == 0, result.stderr
    assert "declared exchange cli." in result.stdout
    prefix = result.stdout.split("declared queue ")[1].split(".unrouted")[0]
    assert (
        f"declared exchange {prefix}.events (topic, alternate exchange {prefix}.unrouted)"
        in result.stdout
    )

    async def check() -> None:
        import aio_pika

        connection = await aio_pika.connect(amqp_url)
        async with connection:
            channel = await connection.channel()
            await channel.get_exchange(f"{prefix}.events", ensure=True)
            queue = await channel.get_queue(f"{prefix}.unrouted", ensure=True)
            await queue.delete(if_unused=False, if_empty=False)
            await channel.exchange_delete(f"{prefix}.events")
            await channel.exchange_delete(f"{prefix}.unrouted")

    asyncio.run(check())


def test_declare_without_a_broker_is_one_line() -> None:
    result = cli("declare", env={"BRIDGE_AMQP_URL": f"amqp://guest:guest@127.0.0.1:{free_port()}/"})
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("events-bridge: cannot connect to amqp://guest:***@127.0.0.1:")


def test_declare_tries_every_node_of_a_cluster() -> None:
    urls = [f"amqp://u:secret{n}@127.0.0.1:{free_port()}/" for n in (1, 2)]
    result = cli("declare", env={"BRIDGE_AMQP_URL": ",".join(urls)})
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert line.count("amqp://u:***@127.0.0.1:") == 2, line
    assert "secret" not in line


def test_serving_moves_start_up_objects_out_of_the_collectors_sight() -> None:
    # In a process of its own: collecting and freezing the test process's objects would not do.
    probe = (
        "import gc; from bridge.cli.daemon import GC_THRESHOLD, tune_gc; tune_gc(); "
        "assert gc.get_threshold()[0] == GC_THRESHOLD, gc.get_threshold(); "
        "assert gc.get_freeze_count() > 0"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
