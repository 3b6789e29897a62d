"""Real processes for tests: the CLI, and a daemon whose log goes to a file (never a full pipe)."""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from functools import partial
from pathlib import Path
from typing import Any

from tests.conftest import ROOT
from tests.helpers import CLIENT_ID, SigningKey, key_folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bridge", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        cwd=ROOT,
        check=False,
    )


def daemon_env(tmp_path: Path, signer: SigningKey, amqp_url: str) -> dict[str, str]:
    """The environment a test daemon runs with: ``signer``'s key in a folder of the test's, an
    outbox of its own, a free port, JSON logs."""
    return {
        "BRIDGE_CLIENT_IDS": CLIENT_ID,
        "BRIDGE_KEY_BASE_URL": key_folder(tmp_path / "keys", signer),
        "BRIDGE_OUTBOX_DIR": str(tmp_path / "outbox"),
        "BRIDGE_LOG_FORMAT": "json",
        "BRIDGE_PORT": str(free_port()),
        "BRIDGE_AMQP_URL": amqp_url,
    }


def _limit_files(count: int) -> None:
    """In the child: at most ``count`` open descriptors, soft and hard (it cannot raise it)."""
    resource.setrlimit(resource.RLIMIT_NOFILE, (count, count))


class Daemon:
    """``events-bridge serve`` in a subprocess; JSON logs collected in a file."""

    def __init__(
        self,
        config: Path,
        env: dict[str, str],
        args: tuple[str, ...] = (),
        max_files: int | None = None,
    ) -> None:
        # Each daemon its own outbox: one test's backlog must never replay into another's.
        env = {"BRIDGE_OUTBOX_DIR": tempfile.mkdtemp(prefix="bridge-outbox-"), **env}
        self.env = env
        self.config = config
        self.url = f"http://127.0.0.1:{env['BRIDGE_PORT']}"
        self.log_file = Path(tempfile.mkstemp(prefix="bridge-", suffix=".log")[1])
        with self.log_file.open("w") as sink:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "bridge", "serve", *args, "--config", str(config)],
                cwd=ROOT,
                env={**os.environ, **env},
                stdout=subprocess.DEVNULL,
                stderr=sink,
                text=True,
                preexec_fn=None if max_files is None else partial(_limit_files, max_files),  # noqa: PLW1509
            )

    def wait_ready(self, seconds: float = 20) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log_file.read_text()
            try:
                with urllib.request.urlopen(self.url + "/readyz", timeout=2) as response:
                    # Ready for tests means the broker is connected (the outbox alone would do
                    # for Adobe), so the topology is declared.
                    if json.loads(response.read())["broker"] == "connected":
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise AssertionError("daemon not ready")

    def logs(self) -> list[dict[str, Any]]:
        text = self.log_file.read_text()
        assert "Traceback" not in text, text
        return [json.loads(line) for line in text.splitlines() if line.startswith("{")]

    def wait_log(self, event: str, seconds: float = 10) -> dict[str, Any]:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            found = [line for line in self.logs() if line["event"] == event]
            if found:
                return found[-1]
            time.sleep(0.05)
        raise AssertionError(f"no {event} in the daemon's log")

    def stop(self) -> tuple[int, list[dict[str, Any]]]:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=30)
        return self.process.returncode, self.logs()

    @property
    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
